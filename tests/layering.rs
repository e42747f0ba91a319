//! The crate's modules are layered: every `crate::module` path in a module's code (unit tests
//! excepted) names a module of a strictly lower layer, so there is no import cycle and a
//! reader can follow a request downward. A new top-level module must be given a layer here.
//! See DESIGN.md, "Layers".

use std::collections::BTreeMap;
use std::path::Path;

/// Lower numbers are lower layers: a module may import only modules below its own.
const LAYERS: &[(&str, u8)] = &[
    // Pure: the envelope, the outcome vocabulary, keys, policies.
    ("entry", 0),
    ("outcome", 0),
    ("key", 1),
    ("policy", 1),
    // The store interface and its Redis, memory and near-tier implementations.
    ("store", 2),
    // Protocol-agnostic: lookup, coalescing, recording, tasks, the shared state.
    ("engine", 3),
    // The handle sits below the HTTP front end for now: a successful write's response
    // invalidates its path through it (`http::future::invalidate_after_write`).
    ("handle", 4),
    // Front ends: gRPC rides on the HTTP response future.
    ("http", 5),
    ("grpc", 6),
    // The Tower surface.
    ("service", 7),
    ("value", 7),
    ("layer", 8),
];

fn imports() -> BTreeMap<String, Vec<(String, String)>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("src/ is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).expect("under src/");
            let top = rel
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .expect("a UTF-8 file name")
                .trim_end_matches(".rs")
                .to_owned();
            if top == "lib" {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("a readable source file");
            // Unit tests may reach anywhere.
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            let list = found.entry(top.clone()).or_default();
            for (at, _) in code.match_indices("crate::") {
                let name: String = code[at + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                if !name.is_empty() && name != top {
                    list.push((name, rel.display().to_string()));
                }
            }
        }
    }
    found
}

#[test]
fn every_import_points_to_a_lower_layer() {
    let layer = |m: &str| LAYERS.iter().find(|(n, _)| *n == m).map(|(_, l)| *l);
    let found = imports();
    let mut wrong = Vec::new();
    for (module, uses) in &found {
        let Some(own) = layer(module) else {
            wrong.push(format!(
                "module `{module}` has no layer in tests/layering.rs"
            ));
            continue;
        };
        for (used, file) in uses {
            // Paths such as `crate::CacheLayer` (root re-exports) start with a capital.
            if let Some(theirs) = layer(used) {
                if theirs >= own {
                    wrong.push(format!(
                        "{file}: `{module}` (layer {own}) uses `crate::{used}` (layer {theirs})"
                    ));
                }
            } else if found.contains_key(used) {
                wrong.push(format!("module `{used}` has no layer in tests/layering.rs"));
            }
        }
    }
    wrong.sort();
    wrong.dedup();
    assert!(
        wrong.is_empty(),
        "imports against the layering:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn every_layered_module_exists() {
    let found = imports();
    for (name, _) in LAYERS {
        assert!(
            found.contains_key(*name),
            "tests/layering.rs names `{name}`, not in src/"
        );
    }
}
