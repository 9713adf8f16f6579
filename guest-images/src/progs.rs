//! Static C test programs that park guest tasks in known kernel functions.

use std::path::Path;
use std::process::Command;

use crate::error::ImagesError;
use crate::fsutil::{ensure_tool, read, read_opt, run, sha256_hex, write_atomic};

/// A test program: its name (installed as `/bin/<name>` in the guest) and C source.
#[derive(Debug, Clone, Copy)]
pub struct Prog {
    /// Executable name.
    pub name: &'static str,
    /// C source text.
    pub source: &'static str,
}

/// Every test program, from `guest-images/progs/*.c`.
pub const PROGS: &[Prog] = &[
    Prog {
        name: "hvpoll",
        source: include_str!("../progs/hvpoll.c"),
    },
    Prog {
        name: "spin",
        source: include_str!("../progs/spin.c"),
    },
    Prog {
        name: "cmdloop",
        source: include_str!("../progs/cmdloop.c"),
    },
    Prog {
        name: "pipewait",
        source: include_str!("../progs/pipewait.c"),
    },
    Prog {
        name: "ttyread",
        source: include_str!("../progs/ttyread.c"),
    },
    Prog {
        name: "hammer",
        source: include_str!("../progs/hammer.c"),
    },
];

/// Compiler flags of every program.
const CFLAGS: &[&str] = &["-static", "-O2", "-Wall"];

/// The compiler's version line (part of the rebuild key).
pub fn gcc_version() -> Result<String, ImagesError> {
    let out = run(Command::new("gcc").arg("--version"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// The rebuild key of a program: source, flags and compiler.
pub fn build_key(prog: &Prog, gcc: &str) -> String {
    let mut parts: Vec<&[u8]> = vec![prog.name.as_bytes(), prog.source.as_bytes(), gcc.as_bytes()];
    parts.extend(CFLAGS.iter().map(|f| f.as_bytes()));
    sha256_hex(parts)
}

/// Path of the stamp recording a program's build key.
fn stamp_path(dir: &Path, name: &str) -> std::path::PathBuf {
    dir.join(format!(".{name}.key"))
}

/// Whether `dir/<name>` was built from the current key.
pub fn is_current(dir: &Path, prog: &Prog, gcc: &str) -> bool {
    dir.join(prog.name).is_file()
        && read_opt(&stamp_path(dir, prog.name)).as_deref() == Some(build_key(prog, gcc).as_bytes())
}

/// Builds every program that is missing or stale into `dir`.
pub fn ensure(dir: &Path) -> Result<(), ImagesError> {
    ensure_tool("gcc", "gcc")?;
    let gcc = gcc_version()?;
    // glibc's static archive comes with libc6-dev (a gcc dependency on Debian).
    for prog in PROGS {
        if is_current(dir, prog, &gcc) {
            continue;
        }
        eprintln!("hvpatch-images: building {}", prog.name);
        let work = dir.join(format!(".build.{}.{}", prog.name, std::process::id()));
        std::fs::create_dir_all(&work).map_err(|e| ImagesError::io("creating", &work, e))?;
        let src = work.join(format!("{}.c", prog.name));
        let bin = work.join(prog.name);
        let result = write_atomic(&src, prog.source.as_bytes(), 0o644)
            .and_then(|()| {
                run(Command::new("gcc")
                    .args(CFLAGS)
                    .arg("-o")
                    .arg(&bin)
                    .arg(&src))
            })
            .and_then(|_| read(&bin))
            .and_then(|data| write_atomic(&dir.join(prog.name), &data, 0o755))
            .and_then(|()| {
                write_atomic(
                    &stamp_path(dir, prog.name),
                    build_key(prog, &gcc).as_bytes(),
                    0o644,
                )
            });
        let _ = std::fs::remove_dir_all(&work);
        result?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_file_is_listed() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("progs");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().to_string_lossy().into_owned();
                name.strip_suffix(".c").map(str::to_string)
            })
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = PROGS.iter().map(|p| p.name.to_string()).collect();
        listed.sort();
        assert_eq!(on_disk, listed, "add new progs/*.c files to PROGS");
    }

    #[test]
    fn build_key_changes_with_source_and_compiler() {
        let a = Prog {
            name: "a",
            source: "int main(){}",
        };
        let b = Prog {
            name: "a",
            source: "int main(){return 1;}",
        };
        assert_ne!(build_key(&a, "gcc 12"), build_key(&b, "gcc 12"));
        assert_ne!(build_key(&a, "gcc 12"), build_key(&a, "gcc 13"));
        assert_eq!(build_key(&a, "gcc 12"), build_key(&a, "gcc 12"));
    }
}
