//! The guest kernel's own livepatch, for comparison and coexistence tests: builds the klp
//! module in `tests/klp/` for a guest's exact Debian kernel with its linux-headers package.

use std::path::Path;
use std::process::Command;

/// The module's name (`/sys/kernel/livepatch/<name>`).
pub const KLP_MODULE: &str = "hvp_klp_cmdline";

/// What `/proc/cmdline` reads with the klp module enabled.
pub const KLP_CMDLINE: &str = "this has been live patched";

/// Builds `tests/klp/hvp_klp_cmdline.ko` for kernel `release`
/// (`make -C /usr/src/linux-headers-<release> M=<copy> modules`).
pub fn build_klp_module(release: &str) -> Result<Vec<u8>, String> {
    let headers = format!("/usr/src/linux-headers-{release}");
    if !Path::new(&headers).is_dir() {
        return Err(format!(
            "{headers} is missing: install it with `apt-get install linux-headers-{release}` (scripts/setup does)"
        ));
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("klp");
    let dir = std::env::temp_dir().join(format!("hvpatch-klp-{}-{release}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for f in ["Kbuild", "hvp_klp_cmdline.c"] {
        std::fs::copy(src.join(f), dir.join(f)).map_err(|e| format!("copying {f}: {e}"))?;
    }
    let out = Command::new("make")
        .arg("-C")
        .arg(&headers)
        .arg(format!("M={}", dir.display()))
        .arg("modules")
        .output()
        .map_err(|e| format!("running make (apt-get install make gcc): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building the klp module for {release} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let ko = dir.join(format!("{KLP_MODULE}.ko"));
    std::fs::read(&ko).map_err(|e| format!("{}: {e}", ko.display()))
}
