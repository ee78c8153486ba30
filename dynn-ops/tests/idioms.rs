//! `docs/IDIOMS.md` lists every op with its idiom vector; it is generated from the op table,
//! and this test fails when the committed file is stale (`DYNN_BLESS=1` rewrites it).

#[test]
fn idioms_doc_is_up_to_date() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/IDIOMS.md");
    let want = dynn_ops::idioms_markdown();
    if std::env::var_os("DYNN_BLESS").is_some() {
        std::fs::write(&path, &want).expect("docs/IDIOMS.md is writable");
        return;
    }
    let got = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        got == want,
        "docs/IDIOMS.md is stale: run `DYNN_BLESS=1 cargo test -p dynn-ops --test idioms`"
    );
}

#[test]
fn every_op_declares_a_plausible_vector() {
    for op in dynn_ops::op_table() {
        assert!(
            op.idioms.0.iter().all(|&c| c <= 4),
            "{}: idiom counts {:?} look wrong",
            op.name,
            op.idioms.0
        );
    }
}
