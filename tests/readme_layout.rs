//! The README's "Layout" section is the map of the repository: this test fails when a source file
//! under `src/` or a top-level folder is missing from it, or when it names a path that no longer
//! exists.
//!
//! The section is one code block of entries: a path in the first column (`src/cpu/`, `build.rs`),
//! then a description, which may go on over indented lines. A file `src/a/b.rs` is covered by an
//! entry `src/a/b.rs`, or by the entry `src/a/` whose description names `b.rs`.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The entries of the README's Layout block: (path, description).
fn layout() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let section = readme.split("\n## Layout").nth(1).expect("README has a '## Layout' section");
    let block = section.split("```").nth(1).expect("the Layout section holds a code block");
    let mut entries: Vec<(String, String)> = Vec::new();
    for line in block.lines().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        if line.starts_with(' ') {
            let last = entries.last_mut().expect("a continuation line follows an entry");
            last.1.push(' ');
            last.1.push_str(line.trim());
        } else {
            let (path, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            entries.push((path.to_string(), rest.trim().to_string()));
        }
    }
    entries
}

/// Every `.rs` file under `dir`, as paths relative to the repository root with `/` separators.
fn rust_files(dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).expect("readable source folder") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(root()).expect("under the root");
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
}

/// Whether `name` appears in `text` as a whole word (not as part of a longer file name).
fn names(text: &str, name: &str) -> bool {
    text.split(|c: char| c.is_whitespace() || ",;:()".contains(c)).any(|w| w == name)
}

#[test]
fn every_source_file_is_in_the_layout() {
    let entries = layout();
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    assert!(files.len() > 20, "found only {files:?}");
    let missing: Vec<&String> = files
        .iter()
        .filter(|file| {
            let (dir, name) = file.rsplit_once('/').expect("under src/");
            let dir = format!("{dir}/");
            !entries.iter().any(|(path, text)| path == *file || (*path == dir && names(text, name)))
        })
        .collect();
    assert!(missing.is_empty(), "README Layout does not name: {missing:?}");
}

#[test]
fn every_top_level_folder_is_in_the_layout() {
    let entries = layout();
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(root()).expect("readable root") {
        let path = entry.expect("directory entry").path();
        let name = path.file_name().expect("a name").to_string_lossy().to_string();
        let hidden = name.starts_with('.') && name != ".ci";
        if !path.is_dir() || hidden || name == "target" {
            continue;
        }
        let dir = format!("{name}/");
        if !entries.iter().any(|(p, _)| p.starts_with(&dir)) {
            missing.push(name);
        }
    }
    assert!(missing.is_empty(), "README Layout does not name the folders {missing:?}");
}

#[test]
fn every_path_in_the_layout_exists() {
    for (path, text) in layout() {
        assert!(root().join(&path).exists(), "README Layout names {path}, which does not exist");
        if path.starts_with("src/") && path.ends_with('/') {
            for word in text.split(|c: char| c.is_whitespace() || ",;:()".contains(c)) {
                if let Some(stem) = word.strip_suffix(".rs") {
                    let file = root().join(&path).join(format!("{stem}.rs"));
                    assert!(file.exists(), "README Layout names {path}{word}, which does not exist");
                }
            }
        }
    }
}
