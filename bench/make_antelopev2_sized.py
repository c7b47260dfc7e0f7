"""Random-weight antelopev2 models of the real graph sizes, for bench/face_cpu.sh.

    python3 bench/make_antelopev2_sized.py [OUT]   # default ~/.cache/hyperlora/bench/antelopev2-sized
    HYPERLORA_ANTELOPEV2=OUT bash bench/face_cpu.sh

The .onnx files are large (~300 MB together): they are written outside the repository and must
never be committed. Export and naming come from scripts/fixtures/face.py (same input/output
names, dynamic axes, Identity-to-initializer clean-up, "bn_data" first node of the landmark
model), so the engine's signature checks and input-normalisation choice see what they see on the
real files.

How close each graph is to the real one:
- glintr100.onnx: EXACT architecture. insightface arcface_torch iresnet100: 3x3 stem 3->64 +
  BN + PReLU, IBasicBlock (BN, conv3x3, BN, PReLU, conv3x3 stride s, BN; 1x1 conv + BN
  downsample), layers [3, 13, 30, 3] at widths 64/128/256/512, BN2d(512), flatten,
  fc 512*7*7 -> 512, BatchNorm1d(512). 112x112 input, 512 output. ~65.2 M parameters.
- scrfd_10g_bnkps.onnx: architecture from the published config
  (deepinsight/insightface detection/scrfd/configs/scrfd/scrfd_10g_bnkps.py) and its
  backbone/neck/head code: ResNetV1e (deep stem 3->28 s2, 28->28, 28->56 with BN+ReLU; 2x2
  max-pool ("no_pool33"); BasicBlock stages (3, 4, 2, 3), planes [56, 88, 88, 224], strides
  1/2/2/2, avg-pool + 1x1 conv + BN downsample), PAFPN (in [56, 88, 88, 224], out 56,
  start_level 1, 3 outputs: 1x1 laterals, nearest top-down, 3x3 fpn convs, 3x3 s2 bottom-up
  convs, 3x3 pafpn convs), SCRFDHead (per-stride towers (strides_share False) of 3 x
  [conv3x3 80, BN, ReLU] shared by cls/reg (cls_reg_share True), 3x3 cls (2), reg (8) with a
  learnable Scale (scale_mode 2), kps (20), 2 anchors, strides 8/16/32), exported like
  insightface's files: sigmoid scores, 2-D [N, 1|4|10] outputs, dynamic H/W.
  Approximations: mmcv details not re-checked line by line (e.g. whether the stem's
  channel split is exactly base//2, ceil_mode of the avg-pool downsample, lateral-conv biases);
  these change the FLOPs by a few percent at most. The real file's node order and
  names may differ. The cls bias is SCRFD's init value -4.595 with small head
  weights, so with random weights it finds no face (scores ~0.01): the bench then times the
  detector alone and runs landmarks/ArcFace/preprocessing on the box the tiny fixture
  detector finds on the same photo.
- 2d106det.onnx: APPROXIMATED. The real file is an mxnet-converted MobileNet-style coordinate
  regressor (insightface alignment/coordinate_reg; ~5 MB of weights, 192x192 -> 212, first
  node "bn_data"); its exact layer list is not published with the code, so this is a
  MobileNetV1-style net (bn_data, 3x3 s2 stem, depthwise-separable blocks with BN + PReLU,
  widths chosen to give ~1.2 M parameters, 4.7 MB fp32 vs 5.0 MB real, global pool, fc -> 212).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "fixtures"))
from face import export, randomise_bn  # noqa: E402

# Output names as scripts/fixtures/face.py gives the tiny detector (the engine reads outputs by position).
NAMES = [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in (8, 16, 32)]
DEFAULT_OUT = Path.home() / ".cache" / "hyperlora" / "bench" / "antelopev2-sized"


# ---------------------------------------------------------------------------------------------
# glintr100 = iresnet100 (arcface_torch)
def conv3x3(i, o, s=1):
    return nn.Conv2d(i, o, 3, s, 1, bias=False)


class IBasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        idt = x if self.downsample is None else self.downsample(x)
        return out + idt


class IResNet100(nn.Module):
    def __init__(self, layers=(3, 13, 30, 3), widths=(64, 128, 256, 512), emb=512):
        super().__init__()
        self.inplanes = 64
        self.conv1 = conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        self.layers = nn.Sequential(*[self._make(w, n) for w, n in zip(widths, layers)])
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.fc = nn.Linear(512 * 7 * 7, emb)
        self.features = nn.BatchNorm1d(emb, eps=1e-5)

    def _make(self, planes, blocks):
        down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, 2, bias=False), nn.BatchNorm2d(planes, eps=1e-5))
        out = [IBasicBlock(self.inplanes, planes, 2, down)]
        self.inplanes = planes
        out += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*out)

    def forward(self, x):
        x = self.layers(self.prelu(self.bn1(self.conv1(x))))
        return self.features(self.fc(self.bn2(x).flatten(1)))


# ---------------------------------------------------------------------------------------------
# scrfd_10g_bnkps = ResNetV1e + PAFPN + SCRFDHead
def cbr(i, o, k=3, s=1, act=True):
    layers = [nn.Conv2d(i, o, k, s, k // 2, bias=False), nn.BatchNorm2d(o)]
    if act:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, i, o, s=1):
        super().__init__()
        self.conv1 = cbr(i, o, 3, s)
        self.conv2 = cbr(o, o, 3, 1, act=False)
        self.down = None
        if s != 1 or i != o:
            pool = [nn.AvgPool2d(s, s, ceil_mode=True, count_include_pad=False)] if s != 1 else []
            self.down = nn.Sequential(*pool, nn.Conv2d(i, o, 1, bias=False), nn.BatchNorm2d(o))

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        return F.relu(self.conv2(self.conv1(x)) + idt)


class SCRFD10G(nn.Module):
    def __init__(self, blocks=(3, 4, 2, 3), planes=(56, 88, 88, 224), base=56, neck=56, feat=80, stacked=3):
        super().__init__()
        self.stem = nn.Sequential(cbr(3, base // 2, 3, 2), cbr(base // 2, base // 2), cbr(base // 2, base))
        stages, c = [], base
        for i, (n, p) in enumerate(zip(blocks, planes)):
            s = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(c, p, s), *[BasicBlock(p, p) for _ in range(1, n)]))
            c = p
        self.stages = nn.ModuleList(stages)
        ins = planes[1:]  # start_level = 1
        self.lateral = nn.ModuleList([nn.Conv2d(c, neck, 1) for c in ins])
        self.fpn = nn.ModuleList([nn.Conv2d(neck, neck, 3, 1, 1) for _ in ins])
        self.downs = nn.ModuleList([nn.Conv2d(neck, neck, 3, 2, 1) for _ in ins[1:]])
        self.pafpn = nn.ModuleList([nn.Conv2d(neck, neck, 3, 1, 1) for _ in ins[1:]])
        self.towers = nn.ModuleList(
            [nn.Sequential(*[cbr(neck if j == 0 else feat, feat) for j in range(stacked)]) for _ in range(3)])
        self.cls = nn.ModuleList([nn.Conv2d(feat, 2, 3, 1, 1) for _ in range(3)])
        self.reg = nn.ModuleList([nn.Conv2d(feat, 8, 3, 1, 1) for _ in range(3)])
        self.kps = nn.ModuleList([nn.Conv2d(feat, 20, 3, 1, 1) for _ in range(3)])
        self.scales = nn.Parameter(torch.ones(3))
        with torch.no_grad():
            for m in (*self.cls, *self.reg, *self.kps):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
            for m in self.cls:
                m.bias.fill_(-4.595)  # SCRFDHead.init_weights

    def forward(self, x):
        x = F.max_pool2d(self.stem(x), 2, 2)
        feats = []
        for st in self.stages:
            x = st(x)
            feats.append(x)
        feats = feats[1:]
        lat = [l(f) for l, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], scale_factor=2.0, mode="nearest")
        inter = [c(l) for c, l in zip(self.fpn, lat)]
        for i in range(len(inter) - 1):
            inter[i + 1] = inter[i + 1] + self.downs[i](inter[i])
        outs = [inter[0]] + [c(t) for c, t in zip(self.pafpn, inter[1:])]
        scores, boxes, kps = [], [], []
        for i, f in enumerate(outs):
            t = self.towers[i](f)
            scores.append(torch.sigmoid(self.cls[i](t)).permute(0, 2, 3, 1).reshape(-1, 1))
            boxes.append((self.reg[i](t) * self.scales[i]).permute(0, 2, 3, 1).reshape(-1, 4))
            kps.append(self.kps[i](t).permute(0, 2, 3, 1).reshape(-1, 10))
        return (*scores, *boxes, *kps)


# ---------------------------------------------------------------------------------------------
# 2d106det: MobileNetV1-style approximation (see docstring)
def dw_sep(i, o, s):
    return nn.Sequential(
        nn.Conv2d(i, i, 3, s, 1, groups=i, bias=False), nn.BatchNorm2d(i), nn.PReLU(i),
        nn.Conv2d(i, o, 1, bias=False), nn.BatchNorm2d(o), nn.PReLU(o))


class Landmark106(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn_data = nn.BatchNorm2d(3, eps=1e-5)
        with torch.no_grad():
            self.bn_data.running_mean.fill_(127.5)
            self.bn_data.running_var.fill_(128.0 * 128.0)
        cfg = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1), (512, 2), (512, 1)]
        layers, c = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.PReLU(32)], 32
        for o, s in cfg:  # 192 -> 96 -> 48 -> 24 -> 12 -> 6
            layers.append(dw_sep(c, o, s))
            c = o
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c, 212)

    def forward(self, x):
        return self.fc(self.body(self.bn_data(x)).mean((2, 3)))


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    for name, model, inp, outs, size, dyn in (
        ("glintr100.onnx", IResNet100(), "input.1", ["embedding"], (112, 112), False),
        ("scrfd_10g_bnkps.onnx", SCRFD10G(), "input.1",
         NAMES, (640, 640), True),
        ("2d106det.onnx", Landmark106(), "data", ["fc1"], (192, 192), False),
    ):
        randomise_bn(model, g)
        n = sum(p.numel() for p in model.parameters())
        path = out / name
        m = export(model, path, inp, outs, size, dyn)
        if name == "2d106det.onnx":
            assert m.graph.node[0].op_type == "BatchNormalization", m.graph.node[0].op_type
            m.graph.node[0].name = "bn_data"
            import onnx
            onnx.save(m, str(path))
        print(f"{path}: {n / 1e6:.2f} M parameters, {path.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
