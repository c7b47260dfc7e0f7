"""A random-weight CLIPModel with openai/clip-vit-large-patch14's exact configuration (428 M
parameters, f16: about 855 MB), for timing prompt scores without downloading the real file.

    python3 bench/make_clip_sized.py   # -> ~/.cache/hyperlora/bench/clip-vit-large-patch14-sized
"""
import os
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

OUT = Path(os.environ.get("HYPERLORA_BENCH_CACHE", Path.home() / ".cache" / "hyperlora" / "bench")) / "clip-vit-large-patch14-sized"

# openai/clip-vit-large-patch14's config.json (the parts that shape the model).
TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
            max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768,
            bos_token_id=0, eos_token_id=2, pad_token_id=1)
VISION = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
              image_size=224, patch_size=14, hidden_act="quick_gelu", projection_dim=768)

torch.manual_seed(0)
model = CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=768)).eval()
OUT.mkdir(parents=True, exist_ok=True)
model.half().save_pretrained(OUT)
print(OUT, sum(p.numel() for p in model.parameters()) / 1e6, "M parameters")
