//! Parity of the CLIP tokenizers with transformers' and of the prompt parsing and chunking with
//! A1111's, on the tiny SDXL's tokenizers (scripts/fixtures/sdxl_tokenizer.py).

use hyperlora::sdxl::text::prompt::{
    pad_to_same_length, parse_prompt_attention, tokenize_prompt, tokenize_sdxl, PromptOptions,
    TokenChunks, WeightedText,
};
use hyperlora::sdxl::text::tokenizer::{ClipTokenizer, BOS_TOKEN, CONTEXT_LENGTH, EOS_TOKEN};
use serde_json::Value;

use crate::common::{
    fixture, json_ids as ids, tiny_model, tiny_tokenizers as tokenizers, tokenizer_cases as cases,
};

#[test]
fn ids_and_windows_match_transformers() {
    let toks = tokenizers();
    for case in cases() {
        let prompt = case["prompt"].as_str().unwrap();
        for (name, tok) in &toks {
            let expected = &case[*name];
            assert_eq!(
                tok.encode(prompt),
                ids(&expected["ids"]),
                "{name}: ids of {:?}",
                case["name"]
            );
            assert_eq!(
                tok.encode_window(prompt).to_vec(),
                ids(&expected["window"]),
                "{name}: window of {:?}",
                case["name"]
            );
        }
    }
}

#[test]
fn tokenizer_json_folder_tokenizes_the_same() {
    // transformers 5 saves only tokenizer.json + tokenizer_config.json; build such a folder.
    let src = tiny_model("sdxl/tokenizer_2");
    let vocab: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("vocab.json")).unwrap()).unwrap();
    let merges: Vec<Value> = std::fs::read_to_string(src.join("merges.txt"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            serde_json::json!([a, b])
        })
        .collect();
    let added = serde_json::json!([
        {"id": 0, "content": "!", "normalized": false, "special": true},
        {"id": 49406, "content": BOS_TOKEN, "normalized": true, "special": true},
        {"id": 49407, "content": EOS_TOKEN, "normalized": true, "special": true},
    ]);
    let json = serde_json::json!({"added_tokens": added, "model": {"type": "BPE", "vocab": vocab, "merges": merges}});
    let dir = std::env::temp_dir().join(format!("hyperlora-tokenizer-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"pad_token": "!", "bos_token": "<|startoftext|>"}"#,
    )
    .unwrap();
    let tok = ClipTokenizer::from_dir(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(tok.pad_id(), 0);
    for case in cases() {
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(
            tok.encode(prompt),
            ids(&case["tokenizer_2"]["ids"]),
            "{:?}",
            case["name"]
        );
    }
}

fn load(name: &str) -> Value {
    let path = fixture("sdxl_tokenizer", name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn expected_ids(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| {
            c.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn expected_weights(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| {
            c.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn assert_chunks(what: &str, ours: &TokenChunks, ids: &Value, weights: &Value) {
    let ours_ids: Vec<Vec<u32>> = ours.ids.iter().map(|c| c.to_vec()).collect();
    assert_eq!(ours_ids, expected_ids(ids), "{what}: chunk ids");
    let ours_w: Vec<Vec<f32>> = ours.weights.iter().map(|c| c.to_vec()).collect();
    assert_eq!(ours_w, expected_weights(weights), "{what}: chunk weights");
}

/// Parsed pieces equal the reference's, weights bit for bit (`parsed_bits`).
fn assert_parsed(what: &str, ours: &[WeightedText], case: &Value) {
    let texts: Vec<&str> = case["parsed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_str().unwrap())
        .collect();
    let bits: Vec<u64> = case["parsed_bits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap())
        .collect();
    let ours_texts: Vec<&str> = ours.iter().map(|p| p.text.as_str()).collect();
    let ours_bits: Vec<u64> = ours.iter().map(|p| p.weight.to_bits()).collect();
    assert_eq!(ours_texts, texts, "{what}: texts");
    assert_eq!(ours_bits, bits, "{what}: weights {ours:?}");
}

#[test]
fn parse_matches_a1111() {
    for case in load("cases.json")["cases"].as_array().unwrap() {
        let ours = parse_prompt_attention(case["prompt"].as_str().unwrap()).unwrap();
        assert_parsed(&case["name"].to_string(), &ours, case);
    }
}

/// Thousands of random prompts (brackets, weights, BREAK, escapes, unicode, specials, commas)
/// against the Python reference; see scripts/fixtures/sdxl_tokenizer.py --fuzz.
#[test]
#[ignore = "needs HYPERLORA_TOKENIZER_FUZZ=<file from sdxl_tokenizer.py --fuzz>"]
fn fuzz_against_reference() {
    let path = std::env::var("HYPERLORA_TOKENIZER_FUZZ").expect("HYPERLORA_TOKENIZER_FUZZ");
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let toks = tokenizers();
    for case in cases.as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let what = format!("{prompt:?}");
        if case.get("error").is_some() {
            assert!(
                parse_prompt_attention(prompt).is_err(),
                "{what}: A1111 fails here"
            );
            continue;
        }
        assert_parsed(&what, &parse_prompt_attention(prompt).unwrap(), case);
        for (name, tok) in &toks {
            let e = &case[*name];
            let ids: Vec<u32> = e["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(tok.encode(prompt), ids, "{name} {what}: ids");
            let chunks = tokenize_prompt(tok, prompt).unwrap();
            assert_chunks(
                &format!("{name} {what}"),
                &chunks,
                &e["chunk_ids"],
                &e["chunk_weights"],
            );
        }
    }
    eprintln!("{} fuzz cases match", cases.as_array().unwrap().len());
}

#[test]
fn chunks_match_a1111_reference() {
    let toks = tokenizers();
    for case in load("cases.json")["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        for (name, tok) in &toks {
            let ours = tokenize_prompt(tok, prompt).unwrap();
            let what = format!("{name} {}", case["name"]);
            assert_chunks(
                &what,
                &ours,
                &case[*name]["chunk_ids"],
                &case[*name]["chunk_weights"],
            );
            assert_eq!(ours.flat_ids().len(), ours.len() * CONTEXT_LENGTH);
        }
    }
}

#[test]
fn pairs_pad_to_the_same_chunk_count() {
    let toks = tokenizers();
    for pair in load("pairs.json")["pairs"].as_array().unwrap() {
        for (name, tok) in &toks {
            let mut pos = tokenize_prompt(tok, pair["positive"].as_str().unwrap()).unwrap();
            let mut neg = tokenize_prompt(tok, pair["negative"].as_str().unwrap()).unwrap();
            pad_to_same_length(&mut pos, &mut neg, tok);
            let e = &pair[*name];
            let what = format!("{name} {}", pair["name"]);
            assert_chunks(&what, &pos, &e["positive_ids"], &e["positive_weights"]);
            assert_chunks(&what, &neg, &e["negative_ids"], &e["negative_weights"]);
        }
    }
}

#[test]
fn sdxl_chunks_share_one_count() {
    let toks = tokenizers();
    let cases = load("cases.json");
    let case = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "bang_long")
        .unwrap();
    let prompt = case["prompt"].as_str().unwrap();
    let chunks = tokenize_sdxl(
        [&toks[0].1, &toks[1].1],
        prompt,
        "",
        &PromptOptions::default(),
    )
    .unwrap();
    assert_eq!(chunks.len(), 2);
    // tokenizer_2 needs two chunks here; the first tokenizer's one chunk gets an empty one.
    assert_eq!(
        chunks.positive[0].ids[0].to_vec(),
        expected_ids(&case["tokenizer"]["chunk_ids"])[0]
    );
    assert_eq!(chunks.positive[0].ids[1], toks[0].1.window(&[]));
    assert_chunks(
        "tokenizer_2",
        &chunks.positive[1],
        &case["tokenizer_2"]["chunk_ids"],
        &case["tokenizer_2"]["chunk_weights"],
    );
    for (i, (_, tok)) in toks.iter().enumerate() {
        assert_eq!(chunks.negative[i].ids, vec![tok.window(&[]); 2]);
    }
}
