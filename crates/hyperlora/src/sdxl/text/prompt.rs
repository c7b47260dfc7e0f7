//! AUTOMATIC1111 prompt weighting and long prompts in 75-token chunks.
//!
//! - [`parse_prompt_attention`] is A1111's `prompt_parser.parse_prompt_attention`: `(a:1.3)` sets a
//!   weight, `(a)` multiplies by 1.1, `[a]` divides by 1.1 (multiplies by `1/1.1`), groups nest,
//!   `\(` `\)` `\[` `\]` `\\` are literal, unclosed groups still apply their multiplier to the end of
//!   the prompt, stray closers and weights outside a group stay text, and `BREAK` (upper case, a whole
//!   word) separates chunks. Weights are computed in f64 in the same order as Python, so they are
//!   bit-identical to A1111's.
//! - [`tokenize_prompt`] is `sd_hijack_clip`'s `tokenize_line`: each weighted piece is tokenized on
//!   its own, tokens go into chunks of 75, a chunk that fills up within 20 tokens after a comma is cut
//!   after that comma (`comma_padding_backtrack = 20`), `BREAK` starts a new chunk, an empty prompt
//!   gives one empty chunk. Each chunk becomes 77 ids: BOS, its tokens, EOS, then the tokenizer's pad
//!   id, with weight 1.0 on BOS, EOS and padding. (A1111 first fills with EOS and, where pad ≠ EOS,
//!   overwrites everything after the first EOS with the pad id before encoding; the ids it encodes are
//!   these. For a plain prompt of ≤ 75 tokens the chunk is exactly diffusers' tokenizer output.)
//!
//! What A1111 then does with the chunks (for the text encoder / pipeline): each chunk is encoded on its
//! own and the hidden states are concatenated along the sequence (77·k tokens); the pooled output
//! comes from the first chunk; with the default "Original" emphasis the hidden states `z` of a chunk
//! batch are scaled per token by its weight and then rescaled so their overall mean is unchanged:
//! `z' = z·w; z' *= mean(z) / mean(z')`.

use std::sync::OnceLock;

use regex::Regex;

use super::tokenizer::{ClipTokenizer, CONTEXT_LENGTH};
use crate::error::{Error, Result};

/// Tokens of prompt text per chunk (77 minus BOS and EOS).
pub const CHUNK_TOKENS: usize = CONTEXT_LENGTH - 2;
/// A1111's default `comma_padding_backtrack`.
pub const COMMA_PADDING_BACKTRACK: usize = 20;
/// Brackets open at once, at most. A1111 has no limit, but applying a group's multiplier costs
/// one multiplication per piece inside it (100k nested `(` take seconds), and `1.1^256` is
/// already a weight of 4·10^10: deeper nesting is refused.
pub const MAX_BRACKET_DEPTH: usize = 256;
const ROUND_BRACKET_MULTIPLIER: f64 = 1.1;
const SQUARE_BRACKET_MULTIPLIER: f64 = 1.0 / 1.1;

/// A run of prompt text with its attention weight. A1111 marks a chunk break as the text `BREAK`
/// with weight exactly -1 (see [`WeightedText::is_break`]); a `BREAK` inside a bracket group gets its
/// weight multiplied like any text and is then tokenized as the word "break", as in A1111.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedText {
    pub text: String,
    pub weight: f64,
}

impl WeightedText {
    fn new(text: impl Into<String>, weight: f64) -> Self {
        Self {
            text: text.into(),
            weight,
        }
    }

    /// A chunk break (`BREAK` between words, outside any bracket group).
    pub fn is_break(&self) -> bool {
        self.text == "BREAK" && self.weight == -1.0
    }
}

/// The tokens of a prompt in 77-token chunks, for one tokenizer.
///
/// `ids[k]` is chunk k: BOS, up to 75 tokens, EOS, then the tokenizer's pad id (49407 for SDXL's
/// first tokenizer, 0 for the second). `weights[k][i]` is the A1111 attention multiplier of
/// `ids[k][i]` (1.0 on BOS, EOS and padding), as f32 like A1111's `torch.asarray(multipliers)`.
/// There is always at least one chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenChunks {
    pub ids: Vec<[u32; CONTEXT_LENGTH]>,
    pub weights: Vec<[f32; CONTEXT_LENGTH]>,
}

impl TokenChunks {
    /// The chunk of the empty prompt (BOS, EOS, padding), as A1111 pads a shorter conditioning.
    pub fn empty(tokenizer: &ClipTokenizer) -> Self {
        Self {
            ids: vec![tokenizer.window(&[])],
            weights: vec![[1.0; CONTEXT_LENGTH]],
        }
    }

    /// Number of chunks (≥ 1).
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Never true for chunks from [`tokenize_prompt`]; present for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Appends empty-prompt chunks until there are `n`.
    pub fn pad_to(&mut self, n: usize, tokenizer: &ClipTokenizer) {
        let empty = tokenizer.window(&[]);
        while self.ids.len() < n {
            self.ids.push(empty);
            self.weights.push([1.0; CONTEXT_LENGTH]);
        }
    }

    /// All ids, chunk after chunk (77·len values), e.g. for a `[len, 77]` tensor.
    pub fn flat_ids(&self) -> Vec<u32> {
        self.ids.iter().flatten().copied().collect()
    }

    /// All weights, chunk after chunk (77·len values).
    pub fn flat_weights(&self) -> Vec<f32> {
        self.weights.iter().flatten().copied().collect()
    }
}

/// Switches of A1111's text processing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptOptions {
    /// Parse `(a:1.3)`, `(a)`, `[a]`, escapes and `BREAK` (A1111's emphasis "Original"); when false
    /// the prompt is one piece of weight 1.0 (emphasis "None"; `BREAK` is then plain text too).
    pub emphasis: bool,
    /// A1111's `comma_padding_backtrack` (0 disables it).
    pub comma_padding_backtrack: usize,
}

impl Default for PromptOptions {
    fn default() -> Self {
        Self {
            emphasis: true,
            comma_padding_backtrack: COMMA_PADDING_BACKTRACK,
        }
    }
}

/// A1111's attention regex, alternatives tried in this order at each position: the escapes `\(`
/// `\)` `\[` `\]` `\\` and a lone backslash, `(`, `[`, `:<number>)` closing a weighted group, `)`,
/// `]`, a run of other text, a lone `:`. Python's `\s` also matches U+001C..U+001F.
fn attention_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(
            r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:[\s\x1C-\x1F]*([+-]?[.\d]+)[\s\x1C-\x1F]*\)|\)|\]|[^\\()\[\]:]+|:",
        )
        .expect("attention regex")
    })
}

/// Python's `\w` for str patterns (letters, numbers, underscore), for the `\b` of `\s*\bBREAK\b\s*`.
fn is_py_word(c: char) -> bool {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| Regex::new(r"\A[\p{L}\p{N}_]\z").expect("word regex"));
    c == '_' || re.is_match(c.encode_utf8(&mut [0; 4]))
}

/// Python's `\s` for str patterns: Unicode White_Space plus U+001C..U+001F.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `re.split(r"\s*\bBREAK\b\s*", text)`.
fn split_break(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut search) = (0, 0);
    while let Some(offset) = text[search..].find("BREAK") {
        let (b, e) = (search + offset, search + offset + "BREAK".len());
        let boundary_before = text[..b].chars().next_back().is_none_or(|c| !is_py_word(c));
        let boundary_after = text[e..].chars().next().is_none_or(|c| !is_py_word(c));
        if !(boundary_before && boundary_after) {
            search = b + 1; // 'B' is one byte
            continue;
        }
        let mut match_start = b;
        while let Some(c) = text[start..match_start]
            .chars()
            .next_back()
            .filter(|&c| is_py_space(c))
        {
            match_start -= c.len_utf8();
        }
        let mut match_end = e;
        while let Some(c) = text[match_end..].chars().next().filter(|&c| is_py_space(c)) {
            match_end += c.len_utf8();
        }
        parts.push(&text[start..match_start]);
        start = match_end;
        search = match_end;
    }
    parts.push(&text[start..]);
    parts
}

/// Python's `float()` on what `[+-]?[.\d]+` matched (`\d` being any Unicode decimal digit).
fn py_float(s: &str) -> Option<f64> {
    let ascii: Option<String> = s
        .chars()
        .map(|c| match c {
            '0'..='9' | '.' | '+' | '-' => Some(c),
            _ => decimal_digit_value(c).and_then(|d| char::from_digit(d, 10)),
        })
        .collect();
    ascii?.parse().ok()
}

/// Value of a Unicode decimal digit (category Nd): Unicode encodes them in runs of ten, 0 to 9.
fn decimal_digit_value(c: char) -> Option<u32> {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| Regex::new(r"\A\p{Nd}\z").expect("digit regex"));
    let is_nd = |c: char| re.is_match(c.encode_utf8(&mut [0; 4]));
    if !is_nd(c) {
        return None;
    }
    let mut steps = 0;
    let mut cp = c as u32;
    while let Some(prev) = cp
        .checked_sub(1)
        .and_then(char::from_u32)
        .filter(|&p| is_nd(p))
    {
        cp = prev as u32;
        steps += 1;
    }
    Some(steps % 10)
}

/// A1111's `parse_prompt_attention`: the prompt as runs of text with their weights (neighbours
/// of equal weight merged; `[("", 1.0)]` for an empty prompt). Fails where A1111 fails: a
/// weight such as `(a:1.2.3)` that Python's `float()` rejects; and where A1111 would go on with
/// nonsense: more than [`MAX_BRACKET_DEPTH`] brackets open at once, or a weight that is not a
/// finite f32 (`(a:1e39)`, `(a:1e309)`: the text encoder's states would become infinite).
pub fn parse_prompt_attention(text: &str) -> Result<Vec<WeightedText>> {
    let mut res: Vec<WeightedText> = Vec::new();
    let mut round_brackets: Vec<usize> = Vec::new();
    let mut square_brackets: Vec<usize> = Vec::new();

    fn multiply_range(res: &mut [WeightedText], start: usize, multiplier: f64) {
        for piece in &mut res[start..] {
            piece.weight *= multiplier;
        }
    }

    for caps in attention_regex().captures_iter(text) {
        let piece = caps.get(0).map_or("", |m| m.as_str());
        let weight = caps.get(1).map(|m| m.as_str());
        if let Some(escaped) = piece.strip_prefix('\\') {
            res.push(WeightedText::new(escaped, 1.0));
        } else if piece == "(" || piece == "[" {
            let stack = if piece == "(" {
                &mut round_brackets
            } else {
                &mut square_brackets
            };
            if stack.len() == MAX_BRACKET_DEPTH {
                return Err(Error::invalid_argument(format!(
                    "the prompt opens more than {MAX_BRACKET_DEPTH} {piece} brackets at once"
                )));
            }
            stack.push(res.len());
        } else if let (Some(weight), false) = (weight, round_brackets.is_empty()) {
            let value = py_float(weight).ok_or_else(|| {
                Error::invalid_argument(format!(
                    "prompt weight {weight:?} is not a number (in {piece:?})"
                ))
            })?;
            let start = round_brackets.pop().expect("open group");
            multiply_range(&mut res, start, value);
        } else if piece == ")" && !round_brackets.is_empty() {
            let start = round_brackets.pop().expect("open group");
            multiply_range(&mut res, start, ROUND_BRACKET_MULTIPLIER);
        } else if piece == "]" && !square_brackets.is_empty() {
            let start = square_brackets.pop().expect("open group");
            multiply_range(&mut res, start, SQUARE_BRACKET_MULTIPLIER);
        } else {
            for (i, part) in split_break(piece).into_iter().enumerate() {
                if i > 0 {
                    res.push(WeightedText::new("BREAK", -1.0));
                }
                res.push(WeightedText::new(part, 1.0));
            }
        }
    }

    for &start in &round_brackets {
        multiply_range(&mut res, start, ROUND_BRACKET_MULTIPLIER);
    }
    for &start in &square_brackets {
        multiply_range(&mut res, start, SQUARE_BRACKET_MULTIPLIER);
    }

    if res.is_empty() {
        res.push(WeightedText::new("", 1.0));
    }

    // Neighbours of equal weight merge (in one pass: removing from the vector one by one is
    // quadratic, seconds for a long prompt of many unmatched brackets).
    let mut merged: Vec<WeightedText> = Vec::with_capacity(res.len());
    for piece in res {
        match merged.last_mut() {
            Some(last) if last.weight == piece.weight => last.text.push_str(&piece.text),
            _ => merged.push(piece),
        }
    }
    if let Some(p) = merged.iter().find(|p| !(p.weight as f32).is_finite()) {
        let text: String = p.text.chars().take(40).collect();
        return Err(Error::invalid_argument(format!(
            "prompt weight {} of {text:?} is out of range",
            p.weight
        )));
    }
    Ok(merged)
}

/// A prompt's chunks for one tokenizer, with A1111's defaults (emphasis on, comma backtrack 20).
pub fn tokenize_prompt(tokenizer: &ClipTokenizer, prompt: &str) -> Result<TokenChunks> {
    tokenize_prompt_with(tokenizer, prompt, &PromptOptions::default())
}

/// A prompt's chunks for one tokenizer (A1111's `tokenize_line`).
pub fn tokenize_prompt_with(
    tokenizer: &ClipTokenizer,
    prompt: &str,
    options: &PromptOptions,
) -> Result<TokenChunks> {
    let parsed = if options.emphasis {
        parse_prompt_attention(prompt)?
    } else {
        vec![WeightedText::new(prompt, 1.0)]
    };
    let comma = tokenizer.token_id(",</w>");
    let backtrack = options.comma_padding_backtrack;

    let mut out = TokenChunks {
        ids: Vec::new(),
        weights: Vec::new(),
    };
    let mut tokens: Vec<u32> = Vec::with_capacity(CHUNK_TOKENS);
    let mut weights: Vec<f64> = Vec::with_capacity(CHUNK_TOKENS);
    let mut last_comma: Option<usize> = None;

    let next_chunk = |out: &mut TokenChunks,
                      tokens: &mut Vec<u32>,
                      weights: &mut Vec<f64>,
                      last_comma: &mut Option<usize>| {
        out.ids.push(tokenizer.window(tokens));
        let mut w = [1.0f32; CONTEXT_LENGTH];
        for (slot, &weight) in w[1..].iter_mut().zip(weights.iter()) {
            *slot = weight as f32;
        }
        out.weights.push(w);
        tokens.clear();
        weights.clear();
        *last_comma = None;
    };

    for piece in &parsed {
        if piece.is_break() {
            next_chunk(&mut out, &mut tokens, &mut weights, &mut last_comma);
            continue;
        }
        for token in tokenizer.encode(&piece.text) {
            if Some(token) == comma {
                last_comma = Some(tokens.len());
            } else if let Some(at) = last_comma.filter(|&at| {
                backtrack != 0 && tokens.len() == CHUNK_TOKENS && tokens.len() - at <= backtrack
            }) {
                // The chunk is full and a comma is near: move what follows the comma to the next chunk.
                let moved_tokens = tokens.split_off(at + 1);
                let moved_weights = weights.split_off(at + 1);
                next_chunk(&mut out, &mut tokens, &mut weights, &mut last_comma);
                tokens = moved_tokens;
                weights = moved_weights;
            }
            if tokens.len() == CHUNK_TOKENS {
                next_chunk(&mut out, &mut tokens, &mut weights, &mut last_comma);
            }
            tokens.push(token);
            weights.push(piece.weight);
        }
    }
    if !tokens.is_empty() || out.ids.is_empty() {
        next_chunk(&mut out, &mut tokens, &mut weights, &mut last_comma);
    }
    Ok(out)
}

/// Pads the prompt's and the negative prompt's chunks (same tokenizer) to the same count with
/// empty-prompt chunks, as A1111 does (`pad_cond_uncond`) so both can be batched for guidance.
pub fn pad_to_same_length(
    positive: &mut TokenChunks,
    negative: &mut TokenChunks,
    tokenizer: &ClipTokenizer,
) {
    let n = positive.len().max(negative.len());
    positive.pad_to(n, tokenizer);
    negative.pad_to(n, tokenizer);
}

/// SDXL's chunks: `[0]` for the first text encoder (CLIP ViT-L/14, `tokenizer/`), `[1]` for the
/// second (OpenCLIP ViT-bigG/14, `tokenizer_2/`). All four have the same number of chunks.
#[derive(Debug, Clone, PartialEq)]
pub struct SdxlPromptChunks {
    pub positive: [TokenChunks; 2],
    pub negative: [TokenChunks; 2],
}

impl SdxlPromptChunks {
    /// Chunks per prompt (the encoders' sequence length is 77 times this).
    pub fn len(&self) -> usize {
        self.positive[0].len()
    }

    /// Never true: every prompt has at least one chunk.
    pub fn is_empty(&self) -> bool {
        self.positive[0].is_empty()
    }
}

/// Tokenizes the prompt and the negative prompt for both SDXL tokenizers and pads all four to the
/// largest chunk count with empty-prompt chunks (the counts can differ between prompt and negative,
/// and, rarely, between the tokenizers: `tokenizer_2` turns every `!` into its own token).
pub fn tokenize_sdxl(
    tokenizers: [&ClipTokenizer; 2],
    positive: &str,
    negative: &str,
    options: &PromptOptions,
) -> Result<SdxlPromptChunks> {
    let mut positive = [
        tokenize_prompt_with(tokenizers[0], positive, options)?,
        tokenize_prompt_with(tokenizers[1], positive, options)?,
    ];
    let mut negative = [
        tokenize_prompt_with(tokenizers[0], negative, options)?,
        tokenize_prompt_with(tokenizers[1], negative, options)?,
    ];
    let n = positive
        .iter()
        .chain(negative.iter())
        .map(TokenChunks::len)
        .max()
        .unwrap_or(1);
    for (i, tokenizer) in tokenizers.iter().enumerate() {
        positive[i].pad_to(n, tokenizer);
        negative[i].pad_to(n, tokenizer);
    }
    Ok(SdxlPromptChunks { positive, negative })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::tiny_tokenizers as tokenizers;

    #[test]
    fn plain_prompt_is_diffusers_window() {
        for (_, tok) in tokenizers() {
            let prompt = "a photo of a cat, highly detailed";
            let chunks = tokenize_prompt(&tok, prompt).unwrap();
            assert_eq!(chunks.ids, vec![tok.encode_window(prompt)]);
            assert_eq!(chunks.weights, vec![[1.0; CONTEXT_LENGTH]]);
        }
    }

    #[test]
    fn bad_weight_is_an_error_as_in_a1111() {
        for prompt in ["(a:1.2.3)", "(a:.)", "(a:+-1)"] {
            let result = parse_prompt_attention(prompt);
            if prompt == "(a:+-1)" {
                // `[+-]?[.\d]+` does not match "+-1": plain text, as in A1111.
                assert_eq!(result.unwrap(), vec![WeightedText::new("a:+-1", 1.1)]);
            } else {
                assert_eq!(
                    result.unwrap_err().code,
                    crate::ErrorCode::InvalidArgument,
                    "{prompt}"
                );
            }
        }
    }

    #[test]
    fn out_of_range_weights_and_deep_nesting_are_refused() {
        // Weights are plain digits (`1e309` is text to A1111's regex): 10^309, 10^39 (finite
        // in f64, not in f32), 10^200 twice, and 0 × ∞.
        let power = |n: usize| format!("1{}", "0".repeat(n));
        for prompt in [
            format!("(a:{})", power(309)),
            format!("(a:{})", power(39)),
            format!("((a:{}):{})", power(200), power(200)),
            format!("(b (a:0):{})", power(309)),
        ] {
            let err = parse_prompt_attention(&prompt).unwrap_err();
            assert_eq!(err.code, crate::ErrorCode::InvalidArgument, "{prompt}");
            assert!(err.message.contains("out of range"), "{err}");
        }
        // A weight that stays finite is A1111's, however odd.
        assert_eq!(
            parse_prompt_attention(&format!("(a:{})", power(30))).unwrap(),
            vec![WeightedText::new("a", 1e30)]
        );
        assert_eq!(
            parse_prompt_attention("(a:1e309)").unwrap(),
            vec![WeightedText::new("a:1e309", 1.1)]
        );
        let deep = |n: usize| format!("{}a", "(".repeat(n));
        assert_eq!(
            parse_prompt_attention(&deep(MAX_BRACKET_DEPTH)).unwrap(),
            vec![WeightedText::new(
                "a",
                (0..MAX_BRACKET_DEPTH).fold(1.0, |w, _| w * ROUND_BRACKET_MULTIPLIER)
            )]
        );
        let err = parse_prompt_attention(&deep(MAX_BRACKET_DEPTH + 1)).unwrap_err();
        assert_eq!(err.code, crate::ErrorCode::InvalidArgument);
        // Closed groups do not count: only brackets open at once.
        let flat = "(a) ".repeat(10 * MAX_BRACKET_DEPTH);
        assert!(parse_prompt_attention(&flat).is_ok());
    }

    #[test]
    fn long_prompts_of_many_pieces_parse_in_linear_time() {
        // 40k unmatched closers and weights: 120k pieces of weight 1 to merge.
        let prompt = "x:1e309)".repeat(40_000);
        let start = std::time::Instant::now();
        let parsed = parse_prompt_attention(&prompt).unwrap();
        assert_eq!(parsed, vec![WeightedText::new(&prompt, 1.0)]);
        assert!(start.elapsed().as_secs_f64() < 2.0, "{:?}", start.elapsed());
    }

    #[test]
    fn unicode_digits_parse_like_python_float() {
        assert_eq!(py_float("١.٥"), Some(1.5));
        assert_eq!(py_float("𝟗"), Some(9.0));
        assert_eq!(py_float(".5"), Some(0.5));
        assert_eq!(py_float("5."), Some(5.0));
        assert_eq!(py_float("."), None);
    }

    #[test]
    fn options_switch_off_emphasis_and_backtrack() {
        let (_, tok) = tokenizers().remove(0);
        let plain = tokenize_prompt_with(
            &tok,
            "(a:1.5) BREAK b",
            &PromptOptions {
                emphasis: false,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(plain.ids, vec![tok.encode_window("(a:1.5) BREAK b")]);
        let prompt = format!(
            "{}, {}",
            vec!["cat"; 60].join(" "),
            vec!["dog"; 30].join(" ")
        );
        let no_bt = tokenize_prompt_with(
            &tok,
            &prompt,
            &PromptOptions {
                comma_padding_backtrack: 0,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(no_bt.ids[0][CONTEXT_LENGTH - 1], tok.eos_id());
        assert_ne!(
            no_bt.ids[0][CONTEXT_LENGTH - 2],
            tok.eos_id(),
            "full chunk without backtrack"
        );
        let bt = tokenize_prompt(&tok, &prompt).unwrap();
        assert_eq!(
            bt.ids[0][62],
            tok.eos_id(),
            "cut after the comma at token 61"
        );
    }
}
