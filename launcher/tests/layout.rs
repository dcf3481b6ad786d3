//! The launcher's parts import each other only one way (see the crate docs): a module of
//! `reports` or `rendezvous` that reached into `supervision` would make a cycle.

use std::collections::BTreeSet;
use std::path::Path;

const PARTS: [&str; 4] = ["configuration", "rendezvous", "reports", "supervision"];

/// The parts each part may import.
fn allowed(part: &str) -> &'static [&'static str] {
    match part {
        "supervision" => &["configuration", "rendezvous", "reports"],
        "configuration" => &["rendezvous", "reports"],
        _ => &[],
    }
}

/// `(file, part it names)` for every `crate::<part>` in the part's sources.
fn imports(part: &str) -> BTreeSet<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(part);
    let mut found = BTreeSet::new();
    let mut dirs = vec![dir];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("the part's folder") {
            let path = entry.expect("a folder entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("a source file");
            for other in PARTS {
                if text.contains(&format!("crate::{other}::")) {
                    found.insert((path.display().to_string(), other.to_owned()));
                }
            }
        }
    }
    found
}

#[test]
fn the_parts_import_each_other_one_way_only() {
    let mut wrong = Vec::new();
    let mut edges = 0;
    for part in PARTS {
        for (file, other) in imports(part) {
            if other == part {
                continue;
            }
            edges += 1;
            if !allowed(part).contains(&other.as_str()) {
                wrong.push(format!("{file} imports crate::{other}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layout:\n{}",
        wrong.join("\n")
    );
    // The scan found the imports that do exist (it is not reading empty folders).
    assert!(edges >= 5, "only {edges} imports between parts found");
}
