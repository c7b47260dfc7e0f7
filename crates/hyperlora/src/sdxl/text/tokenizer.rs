//! CLIP's byte-level BPE tokenizer, behaving exactly as transformers' `CLIPTokenizer` (5.x, backed by
//! the `tokenizers` library) does on SDXL's `tokenizer/` and `tokenizer_2/` folders, which is what
//! diffusers' SDXL pipeline runs.
//!
//! The steps, in the reference's order:
//! 1. special ("added") tokens whose `normalized` flag is false are cut out of the raw text;
//! 2. each remaining piece is normalised: NFC, every run of Unicode whitespace → one space, and
//!    lowercasing char by char (so a final `Σ` becomes `σ`, not `ς`); no ftfy, no HTML unescaping
//!    (open_clip's own tokenizer does those; transformers does not);
//! 3. special tokens with `normalized: true` are cut out of the normalised pieces;
//! 4. CLIP's pre-tokenisation regex splits the rest into words (whitespace dropped), then the
//!    byte-level pre-tokeniser's GPT-2 split, then UTF-8 bytes → CLIP's printable byte alphabet;
//! 5. BPE with `</w>` appended to each word's last symbol.
//!
//! Which special tokens exist and their `normalized` flags follow transformers' loading rules: for
//! SDXL's folders `<|startoftext|>` is matched after lowercasing, `<|endoftext|>` only verbatim in the
//! first tokenizer (its pad token, a plain string, overrides the flag), and in `tokenizer_2` the pad
//! token `!` becomes a special token: `"wow!"` gives `[wow</w>, 0]` there but `[wow</w>, !</w>]` with
//! the first tokenizer.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use regex::Regex;
use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

use crate::error::{Error, Result};

/// Tokens per CLIP window: BOS, up to 75 tokens, EOS (then padding).
pub const CONTEXT_LENGTH: usize = 77;
/// `<|startoftext|>`.
pub const BOS_TOKEN: &str = "<|startoftext|>";
/// `<|endoftext|>`.
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// Id of `<|startoftext|>` in CLIP's vocabulary.
pub const BOS_ID: u32 = 49406;
/// Id of `<|endoftext|>` in CLIP's vocabulary.
pub const EOS_ID: u32 = 49407;
/// Entries in CLIP's vocabulary.
pub const VOCAB_SIZE: usize = 49408;
/// Pad token of SDXL's first tokenizer (CLIP ViT-L/14): `<|endoftext|>`, id 49407.
pub const SDXL_PAD_TOKEN: &str = EOS_TOKEN;
/// Pad token of SDXL's second tokenizer (OpenCLIP ViT-bigG/14): `!`, id 0.
pub const SDXL_PAD_TOKEN_2: &str = "!";
/// CLIP keeps the first 49152 - 256 - 2 merges of its BPE file.
const N_MERGES: usize = 49152 - 256 - 2;

/// A special token cut out of the text before BPE.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AddedToken {
    content: String,
    id: u32,
    /// Matched in the normalised (lowercased) text rather than the raw text.
    normalized: bool,
}

/// CLIP's BPE tokenizer with one window's special ids (BOS 49406, EOS 49407, the pad id).
#[derive(Clone)]
pub struct ClipTokenizer {
    encoder: HashMap<String, u32>,
    /// (left id, right id) → (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Id of each byte's character, without and with `</w>` (None: not in the vocabulary).
    byte_ids: [Option<u32>; 256],
    byte_eow_ids: [Option<u32>; 256],
    /// Special tokens matched in the raw text, then those matched in the normalised text.
    raw_added: Vec<AddedToken>,
    normalized_added: Vec<AddedToken>,
    unk_id: u32,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.encoder.len())
            .field("merges", &self.merges.len())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

/// CLIP's map from UTF-8 bytes to printable characters (GPT-2's `bytes_to_unicode`).
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    table
}

/// The byte alphabet in vocabulary order: printable bytes first, then the remapped ones.
fn byte_alphabet() -> Vec<char> {
    let table = bytes_to_unicode();
    let mut order: Vec<usize> = (0..256).filter(|&b| table[b] as u32 == b as u32).collect();
    order.extend((0..256).filter(|&b| table[b] as u32 != b as u32));
    order.into_iter().map(|b| table[b]).collect()
}

/// CLIP's 49,408-entry vocabulary derived from its merges, as CLIP itself builds it.
fn vocab_from_merges(merges: &[(String, String)]) -> HashMap<String, u32> {
    let alphabet = byte_alphabet();
    let mut tokens: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
    tokens.extend(alphabet.iter().map(|c| format!("{c}</w>")));
    tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.push(BOS_TOKEN.to_string());
    tokens.push(EOS_TOKEN.to_string());
    tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, i as u32))
        .collect()
}

/// Parses a `merges.txt` (a `#version` header line is skipped, as are blank lines).
fn parse_merges(text: &str, what: &str) -> Result<Vec<(String, String)>> {
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if (i == 0 && line.contains("#version")) || line.is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                merges.push((a.to_string(), b.to_string()))
            }
            _ => {
                return Err(Error::bad_weights(format!(
                    "{what}: line {} is not a BPE merge: {line:?}",
                    i + 1
                )))
            }
        }
    }
    Ok(merges)
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::from(e).context(path.display()))
}

fn read_json(path: &Path) -> Result<Value> {
    serde_json::from_str(&read_text(path)?)
        .map_err(|e| Error::bad_weights(format!("{}: invalid JSON: {e}", path.display())))
}

/// A special-token entry of `special_tokens_map.json` / `tokenizer_config.json`: a plain string
/// (transformers makes it `normalized: false`) or an `AddedToken` object.
fn special_entry(value: &Value) -> Option<(String, bool)> {
    match value {
        Value::String(s) => Some((s.clone(), false)),
        Value::Object(o) => {
            let content = o.get("content")?.as_str()?.to_string();
            let normalized = o.get("normalized").and_then(Value::as_bool).unwrap_or(true);
            Some((content, normalized))
        }
        _ => None,
    }
}

/// bos, eos, unk and pad tokens of a folder: `special_tokens_map.json` first, then
/// `tokenizer_config.json`, then CLIPTokenizer's defaults (plain strings).
fn special_tokens_of(dir: &Path) -> Result<[(String, bool); 4]> {
    let mut sources = Vec::new();
    for name in ["special_tokens_map.json", "tokenizer_config.json"] {
        let path = dir.join(name);
        if path.is_file() {
            sources.push(read_json(&path)?);
        }
    }
    let pick = |key: &str, default: &str| {
        sources
            .iter()
            .find_map(|s| s.get(key).and_then(special_entry))
            .unwrap_or_else(|| (default.to_string(), false))
    };
    Ok([
        pick("bos_token", BOS_TOKEN),
        pick("eos_token", EOS_TOKEN),
        pick("unk_token", EOS_TOKEN),
        pick("pad_token", EOS_TOKEN),
    ])
}

/// The word-splitting regexes: CLIP's pre-tokeniser, then the byte-level pre-tokeniser's GPT-2 split
/// (its whitespace alternatives never apply: CLIP's pieces hold no whitespace). Rust's `\s` is Unicode
/// White_Space, the same set as the reference's Oniguruma `\s`.
fn clip_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
            .expect("CLIP regex")
    })
}

fn byte_level_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+").expect("GPT-2 regex")
    })
}

fn whitespace_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"\s+").expect("whitespace regex"))
}

/// transformers' CLIP normaliser: NFC, whitespace runs → " ", per-character lowercase.
fn normalize(text: &str) -> String {
    let nfc: String = text.nfc().collect();
    whitespace_regex()
        .replace_all(&nfc, " ")
        .chars()
        .flat_map(char::to_lowercase)
        .collect()
}

enum Segment<'a> {
    Text(&'a str),
    Token(u32),
}

/// Cuts special tokens out of `text`, leftmost match first, the longest one at a position.
fn split_added<'a>(text: &'a str, added: &[AddedToken]) -> Vec<Segment<'a>> {
    if added.is_empty() {
        return vec![Segment::Text(text)];
    }
    let mut out = Vec::new();
    let (mut start, mut pos) = (0, 0);
    while pos < text.len() {
        let rest = &text[pos..];
        let best = added
            .iter()
            .filter(|t| !t.content.is_empty() && rest.starts_with(&t.content))
            .max_by_key(|t| t.content.len());
        if let Some(token) = best {
            if start < pos {
                out.push(Segment::Text(&text[start..pos]));
            }
            out.push(Segment::Token(token.id));
            pos += token.content.len();
            start = pos;
        } else {
            pos += rest.chars().next().map_or(1, char::len_utf8);
        }
    }
    if start < text.len() {
        out.push(Segment::Text(&text[start..]));
    }
    out
}

impl ClipTokenizer {
    /// Loads a diffusers/transformers tokenizer folder (`tokenizer/` or `tokenizer_2/` of an SDXL
    /// model): `vocab.json` + `merges.txt` (or, where those are absent, the `tokenizer.json` that
    /// transformers 5 saves), with the pad token from `special_tokens_map.json` / `tokenizer_config.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let specials = special_tokens_of(dir)?;
        let (vocab_path, merges_path) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if vocab_path.is_file() && merges_path.is_file() {
            let encoder: HashMap<String, u32> = serde_json::from_str(&read_text(&vocab_path)?)
                .map_err(|e| {
                    Error::bad_weights(format!("{}: not a vocabulary: {e}", vocab_path.display()))
                })?;
            let merges = parse_merges(
                &read_text(&merges_path)?,
                &merges_path.display().to_string(),
            )?;
            let added = added_from_specials(&specials, &encoder)?;
            return Self::build(encoder, &merges, added, &specials[2].0, &specials[3].0)
                .map_err(|e| e.context(dir.display()));
        }
        let json_path = dir.join("tokenizer.json");
        if !json_path.is_file() {
            return Err(Error::model_not_found(format!(
                "{}: no vocab.json + merges.txt or tokenizer.json (not a tokenizer folder)",
                dir.display()
            )));
        }
        Self::from_tokenizer_json(&read_json(&json_path)?, &specials[2].0, &specials[3].0)
            .map_err(|e| e.context(json_path.display()))
    }

    /// Loads CLIP's merges (`models/clip-tokenizer/merges.txt`, or the decompressed
    /// `bpe_simple_vocab_16e6.txt`) and derives the vocabulary from them, for checkpoints that carry
    /// no tokenizer. `pad_token` is [`SDXL_PAD_TOKEN`] for SDXL's first text encoder and
    /// [`SDXL_PAD_TOKEN_2`] for the second; special tokens behave as with SDXL's own folders, so the
    /// result tokenizes exactly like `from_dir` on `tokenizer/` resp. `tokenizer_2/`.
    pub fn from_merges_file(path: impl AsRef<Path>, pad_token: &str) -> Result<Self> {
        let path = path.as_ref();
        let merges = parse_merges(&read_text(path)?, &path.display().to_string())?;
        Self::from_merges(&merges, pad_token).map_err(|e| e.context(path.display()))
    }

    fn from_merges(merges: &[(String, String)], pad_token: &str) -> Result<Self> {
        if merges.len() < N_MERGES {
            return Err(Error::bad_weights(format!(
                "{} BPE merges, CLIP's vocabulary needs the first {N_MERGES}",
                merges.len()
            )));
        }
        let merges = &merges[..N_MERGES];
        let encoder = vocab_from_merges(merges);
        // SDXL's folders: bos/eos/unk are AddedToken objects (normalized), pad a plain string.
        let specials = [
            (BOS_TOKEN.to_string(), true),
            (EOS_TOKEN.to_string(), true),
            (EOS_TOKEN.to_string(), true),
            (pad_token.to_string(), false),
        ];
        let added = added_from_specials(&specials, &encoder)?;
        Self::build(encoder, merges, added, EOS_TOKEN, pad_token)
    }

    fn from_tokenizer_json(json: &Value, unk: &str, pad: &str) -> Result<Self> {
        let model = json
            .get("model")
            .ok_or_else(|| Error::bad_weights("no \"model\""))?;
        let encoder: HashMap<String, u32> =
            serde_json::from_value(model.get("vocab").cloned().unwrap_or(Value::Null))
                .map_err(|e| Error::bad_weights(format!("model.vocab: {e}")))?;
        let mut merges = Vec::new();
        for m in model
            .get("merges")
            .and_then(Value::as_array)
            .ok_or_else(|| Error::bad_weights("no model.merges"))?
        {
            let pair = match m {
                Value::String(s) => s
                    .split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string())),
                Value::Array(a) if a.len() == 2 => match (a[0].as_str(), a[1].as_str()) {
                    (Some(x), Some(y)) => Some((x.to_string(), y.to_string())),
                    _ => None,
                },
                _ => None,
            };
            merges.push(
                pair.ok_or_else(|| Error::bad_weights(format!("model.merges: bad entry {m}")))?,
            );
        }
        let mut added = Vec::new();
        for t in json
            .get("added_tokens")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            let content = t.get("content").and_then(Value::as_str);
            let id = t.get("id").and_then(Value::as_u64);
            let (Some(content), Some(id)) = (content, id) else {
                return Err(Error::bad_weights(format!("added_tokens: bad entry {t}")));
            };
            let normalized = t
                .get("normalized")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            added.push(AddedToken {
                content: content.to_string(),
                id: id as u32,
                normalized,
            });
        }
        Self::build(encoder, &merges, added, unk, pad)
    }

    fn build(
        encoder: HashMap<String, u32>,
        merges: &[(String, String)],
        added: Vec<AddedToken>,
        unk: &str,
        pad: &str,
    ) -> Result<Self> {
        let lookup = |token: &str| -> Result<u32> {
            added
                .iter()
                .find(|t| t.content == token)
                .map(|t| t.id)
                .or_else(|| encoder.get(token).copied())
                .ok_or_else(|| {
                    Error::bad_weights(format!("token {token:?} is not in the vocabulary"))
                })
        };
        let (bos_id, eos_id, unk_id, pad_id) = (
            lookup(BOS_TOKEN)?,
            lookup(EOS_TOKEN)?,
            lookup(unk)?,
            lookup(pad)?,
        );
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, (a, b)) in merges.iter().enumerate() {
            let id = |t: &str| {
                encoder.get(t).copied().ok_or_else(|| {
                    Error::bad_weights(format!(
                        "merge {:?} uses {t:?}, not in the vocabulary",
                        format!("{a} {b}")
                    ))
                })
            };
            let key = (id(a)?, id(b)?);
            let merged = id(&format!("{a}{b}"))?;
            merge_map.entry(key).or_insert((rank as u32, merged));
        }
        let table = bytes_to_unicode();
        let byte_ids = std::array::from_fn(|b| encoder.get(&table[b].to_string()).copied());
        let byte_eow_ids =
            std::array::from_fn(|b| encoder.get(&format!("{}</w>", table[b])).copied());
        let (normalized_added, raw_added): (Vec<_>, Vec<_>) = added
            .into_iter()
            .map(|t| {
                if t.normalized {
                    AddedToken {
                        content: normalize(&t.content),
                        ..t
                    }
                } else {
                    t
                }
            })
            .partition(|t| t.normalized);
        Ok(Self {
            encoder,
            merges: merge_map,
            byte_ids,
            byte_eow_ids,
            raw_added,
            normalized_added,
            unk_id,
            bos_id,
            eos_id,
            pad_id,
        })
    }

    /// Token ids of `text` without BOS/EOS: `tokenizer(text, add_special_tokens=False).input_ids`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        for segment in split_added(text, &self.raw_added) {
            let piece = match segment {
                Segment::Token(id) => {
                    out.push(id);
                    continue;
                }
                Segment::Text(piece) => piece,
            };
            let normalized = normalize(piece);
            for segment in split_added(&normalized, &self.normalized_added) {
                match segment {
                    Segment::Token(id) => out.push(id),
                    Segment::Text(t) => {
                        for word in clip_regex().find_iter(t) {
                            for word in byte_level_regex().find_iter(word.as_str()) {
                                self.bpe(word.as_str().as_bytes(), &mut out);
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// BPE of one word (its UTF-8 bytes), lowest-ranked pair first, every occurrence left to right.
    fn bpe(&self, bytes: &[u8], out: &mut Vec<u32>) {
        let last = bytes.len().saturating_sub(1);
        let mut symbols: Vec<u32> = bytes
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if i == last {
                    self.byte_eow_ids[b as usize]
                } else {
                    self.byte_ids[b as usize]
                }
                .unwrap_or(self.unk_id)
            })
            .collect();
        while symbols.len() > 1 {
            let best = symbols
                .windows(2)
                .filter_map(|w| {
                    self.merges
                        .get(&(w[0], w[1]))
                        .map(|&(rank, merged)| (rank, (w[0], w[1]), merged))
                })
                .min_by_key(|&(rank, _, _)| rank);
            let Some((_, pair, merged)) = best else { break };
            let mut next = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && (symbols[i], symbols[i + 1]) == pair {
                    next.push(merged);
                    i += 2;
                } else {
                    next.push(symbols[i]);
                    i += 1;
                }
            }
            symbols = next;
        }
        out.extend(symbols);
    }

    /// One 77-token window of `tokens`: BOS, the first 75 tokens, EOS, then the pad id; what
    /// `tokenizer(text, padding="max_length", max_length=77, truncation=True)` gives.
    pub fn window(&self, tokens: &[u32]) -> [u32; CONTEXT_LENGTH] {
        let n = tokens.len().min(CONTEXT_LENGTH - 2);
        let mut ids = [self.pad_id; CONTEXT_LENGTH];
        ids[0] = self.bos_id;
        ids[1..=n].copy_from_slice(&tokens[..n]);
        ids[n + 1] = self.eos_id;
        ids
    }

    /// `tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids`, as
    /// diffusers' SDXL pipeline tokenizes a prompt.
    pub fn encode_window(&self, text: &str) -> [u32; CONTEXT_LENGTH] {
        self.window(&self.encode(text))
    }

    /// Id of `<|startoftext|>` (49406).
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Id of `<|endoftext|>` (49407).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id that fills a window after EOS: 49407 for SDXL's first tokenizer, 0 for the second.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Id of a token string (`",</w>"` → 267), if in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.encoder.get(token).copied()
    }

    /// Number of entries in the vocabulary (49408 for CLIP).
    pub fn vocab_size(&self) -> usize {
        self.encoder.len()
    }
}

/// The special tokens transformers registers for a folder: bos, eos, unk, pad in that order, a later
/// entry with the same content overriding an earlier one's `normalized` flag.
fn added_from_specials(
    specials: &[(String, bool); 4],
    encoder: &HashMap<String, u32>,
) -> Result<Vec<AddedToken>> {
    let mut added: Vec<AddedToken> = Vec::new();
    for (content, normalized) in specials {
        let id = *encoder.get(content).ok_or_else(|| {
            Error::bad_weights(format!(
                "special token {content:?} is not in the vocabulary"
            ))
        })?;
        match added.iter_mut().find(|t| &t.content == content) {
            Some(t) => t.normalized = *normalized,
            None => added.push(AddedToken {
                content: content.clone(),
                id,
                normalized: *normalized,
            }),
        }
    }
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{
        json_ids as ids, repo_root, tiny_model, tiny_tokenizers as tokenizers,
        tokenizer_cases as cases,
    };

    #[test]
    fn folders_load_with_sdxl_special_ids() {
        let t = tokenizers();
        assert_eq!(
            (t[0].1.bos_id(), t[0].1.eos_id(), t[0].1.pad_id()),
            (BOS_ID, EOS_ID, 49407)
        );
        assert_eq!(
            (t[1].1.bos_id(), t[1].1.eos_id(), t[1].1.pad_id()),
            (BOS_ID, EOS_ID, 0)
        );
        for (_, tok) in &t {
            assert_eq!(tok.vocab_size(), VOCAB_SIZE);
            assert_eq!(tok.token_id(",</w>"), Some(267));
        }
    }

    #[test]
    fn shipped_merges_give_the_same_tokenizers() {
        let merges = repo_root().join("models/clip-tokenizer/merges.txt");
        let shipped = [
            ClipTokenizer::from_merges_file(&merges, SDXL_PAD_TOKEN).unwrap(),
            ClipTokenizer::from_merges_file(&merges, SDXL_PAD_TOKEN_2).unwrap(),
        ];
        let folders = tokenizers();
        // Same vocabulary as the folders' vocab.json, entry for entry.
        for (ours, (_, folder)) in shipped.iter().zip(&folders) {
            assert_eq!(ours.encoder, folder.encoder);
            assert_eq!(ours.merges, folder.merges);
            assert_eq!(ours.raw_added, folder.raw_added);
            assert_eq!(ours.normalized_added, folder.normalized_added);
            assert_eq!(
                (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id),
                (folder.bos_id, folder.eos_id, folder.pad_id, folder.unk_id)
            );
        }
        for case in cases() {
            let prompt = case["prompt"].as_str().unwrap();
            for (ours, (name, _)) in shipped.iter().zip(&folders) {
                assert_eq!(
                    ours.encode(prompt),
                    ids(&case[*name]["ids"]),
                    "{name}: {:?}",
                    case["name"]
                );
            }
        }
    }

    #[test]
    fn missing_folder_is_model_not_found() {
        let err = ClipTokenizer::from_dir(tiny_model("sdxl/no-such-tokenizer")).unwrap_err();
        assert_eq!(err.code, crate::ErrorCode::ModelNotFound);
    }
}
