//! The checked-in C header is the one cbindgen makes from the sources now.

use std::path::Path;

#[test]
fn the_checked_in_header_is_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/lib.rs"))
        .generate()
        .expect("cbindgen reads the sources")
        .write(&mut generated);
    let generated = String::from_utf8(generated).unwrap();
    let path = root.join("include/ultrapixel.h");
    if std::env::var_os("UPX_BLESS_HEADER").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "{} is not what the sources of the C ABI make now; regenerate it with \
         `UPX_BLESS_HEADER=1 cargo test -p ultrapixel-capi --test header` and commit it",
        path.display()
    );
}
