//! Parity of the single-file (SGM) checkpoint names with diffusers' converters
//! (scripts/fixtures/sdxl_single_file.py).

use std::collections::BTreeSet;

use hyperlora::weights::sgm_names::{NameTable, UnetLayout, VaeLayout};

/// The table at SDXL base scale (1680 + 248 + 196 + 517 names) against the pairs that
/// diffusers' own LDM converters accept (scripts/fixtures/sdxl_single_file.py).
#[test]
fn sdxl_base_names_agree_with_diffusers_converters() {
    let path = crate::common::fixture("sdxl_single_file", "sdxl_base_names.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let tables = [
        ("unet", NameTable::unet(&UnetLayout::sdxl_base())),
        ("vae", NameTable::vae(&VaeLayout::sdxl())),
        ("text_encoder", NameTable::text_encoder()),
        ("text_encoder_2", NameTable::text_encoder_2(32)),
    ];
    for (component, table) in &tables {
        let rows = json[component].as_array().unwrap();
        let mut keys = BTreeSet::new();
        for row in rows {
            let (name, key) = (row[0].as_str().unwrap(), row[1].as_str().unwrap());
            let dims = |v: &serde_json::Value| -> Vec<usize> {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect()
            };
            let m = table
                .to_sgm(name)
                .unwrap_or_else(|| panic!("{component} {name}: no rule"));
            assert_eq!(m.key, key, "{component} {name}");
            assert_eq!(
                m.transform.shape(&dims(&row[3])),
                Some(dims(&row[2])),
                "{component} {name}"
            );
            assert!(
                table.to_diffusers(key).iter().any(|(n, _)| n == name),
                "{key} -> {name}"
            );
            keys.insert(key.strip_prefix(table.prefix()).unwrap().to_string());
        }
        let keys = keys.iter().map(String::as_str);
        match *component {
            "unet" => assert_eq!(UnetLayout::infer(keys).unwrap(), UnetLayout::sdxl_base()),
            "vae" => assert_eq!(VaeLayout::infer(keys).unwrap(), VaeLayout::sdxl()),
            _ => {}
        }
    }
    let counts: Vec<usize> = tables
        .iter()
        .map(|(c, _)| json[c].as_array().unwrap().len())
        .collect();
    assert_eq!(counts, [1680, 248, 196, 517]);
}
