//! The documentation names every drop reason the code has, so the table cannot fall behind.
use engine::DropReason;

#[test]
fn architecture_lists_every_drop_reason() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../ARCHITECTURE.md")).unwrap();
    let missing: Vec<_> =
        DropReason::ALL.iter().map(|r| r.name()).filter(|n| !doc.contains(&format!("| `{n}` |"))).collect();
    assert!(missing.is_empty(), "ARCHITECTURE.md §7 lacks: {missing:?}");
}
