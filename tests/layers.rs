//! The source folders are layers (see src/lib.rs): each may use only the layers before it
//! in `LAYERS`. This test reads every file under src/ and fails on a reference that points
//! the other way, so a dependency cycle cannot creep back in.

use std::path::{Path, PathBuf};

const LAYERS: &[&str] = &[
    "clock",
    "config",
    "telemetry",
    "upstream",
    "state",
    "routing",
    "control",
    "dataplane",
    "ops",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let p = entry.expect("dir entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The layer a file under src/ belongs to (`None`: the crate root and main).
fn layer_of(src: &Path, file: &Path) -> Option<usize> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    LAYERS.iter().position(|l| *l == name)
}

#[test]
fn every_layer_uses_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut bad = Vec::new();
    for f in &files {
        let Some(own) = layer_of(&src, f) else {
            continue;
        };
        let text = std::fs::read_to_string(f).expect("read source");
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for (i, _) in code.match_indices("crate::") {
                let rest = &code[i + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if let Some(used) = LAYERS.iter().position(|l| *l == name) {
                    if used > own {
                        bad.push(format!(
                            "{}:{}: {} uses {}",
                            f.strip_prefix(&src).unwrap_or(f).display(),
                            n + 1,
                            LAYERS[own],
                            name
                        ));
                    }
                }
            }
        }
    }
    assert!(files.len() > 20, "found only {} source files", files.len());
    assert!(bad.is_empty(), "layering violations:\n{}", bad.join("\n"));
}

#[test]
fn no_source_file_outside_tests_is_over_700_lines() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut long = Vec::new();
    for f in &files {
        if f.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(f).expect("read source");
        // Inline test modules count as tests: measure up to `#[cfg(test)]`.
        let code = text.split("\n#[cfg(test)]").next().unwrap_or(&text);
        let n = code.lines().count();
        if n > 700 {
            long.push(format!("{}: {n} lines", f.display()));
        }
    }
    assert!(long.is_empty(), "split these files:\n{}", long.join("\n"));
}
