//! Records the commit the binary is built from, for `gatehouse_build_info` and `--version`
//! readers: `GATEHOUSE_COMMIT` (short hash), or `unknown` outside a git checkout.

use std::process::Command;

fn main() {
    let commit = std::env::var("GATEHOUSE_COMMIT").ok().or_else(|| {
        Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    });
    println!(
        "cargo:rustc-env=GATEHOUSE_COMMIT={}",
        commit
            .filter(|c| !c.is_empty())
            .as_deref()
            .unwrap_or("unknown")
    );
    println!("cargo:rerun-if-env-changed=GATEHOUSE_COMMIT");
    // A new commit changes HEAD (or the branch it names).
    for f in ["../.git/HEAD", "../.git/refs/heads"] {
        println!("cargo:rerun-if-changed={f}");
    }
}
