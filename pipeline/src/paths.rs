//! Resolving the relative paths of an experiment (dataset, cache, output, slides, weights)
//! against the folder of the file that names them.
//!
//! Paths are joined and then cleaned lexically (`examples/quickstart/../../out` becomes `out`),
//! so that what run reports and logs print is the path a user would type. A `..` after a
//! symbolic link is kept: there the lexical and the real parent differ.

use std::path::{Component, Path, PathBuf};

/// `p` itself when absolute, else `base/p`, cleaned of `.` and of `dir/..` pairs.
pub fn resolve_path(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        clean(&base.join(p))
    }
}

/// Removes `.` components and each `dir/..` pair whose `dir` is a plain folder name that is
/// not a symbolic link; keeps leading `..` and the root. An empty result is `.`.
pub fn clean(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    // How many trailing components of `out` are plain names (not `..`, not the root).
    let mut names = 0usize;
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                let is_link = std::fs::symlink_metadata(&out)
                    .map(|m| m.file_type().is_symlink())
                    .unwrap_or(false);
                if names > 0 && !is_link {
                    out.pop();
                    names -= 1;
                } else if out.has_root() && names == 0 {
                    // `/..` is `/`.
                } else {
                    out.push("..");
                }
            }
            Component::Normal(name) => {
                out.push(name);
                names += 1;
            }
            Component::RootDir | Component::Prefix(_) => out.push(component.as_os_str()),
        }
    }
    if out.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(p: &str) -> String {
        clean(Path::new(p)).display().to_string()
    }

    #[test]
    fn cleans_dot_and_dir_dotdot_pairs() {
        assert_eq!(
            c("examples/quickstart/../../out/quickstart"),
            "out/quickstart"
        );
        assert_eq!(c("./a/./b"), "a/b");
        assert_eq!(c("a/.."), ".");
        assert_eq!(c("../x/../y"), "../y");
        assert_eq!(c("../../a"), "../../a");
        assert_eq!(c("/a/../../b"), "/b");
        assert_eq!(c("/"), "/");
    }

    #[test]
    fn absolute_paths_are_kept_and_relative_ones_joined() {
        assert_eq!(
            resolve_path(Path::new("base"), Path::new("/data/s.svs")),
            PathBuf::from("/data/s.svs")
        );
        assert_eq!(
            resolve_path(
                Path::new("examples/spatial"),
                Path::new("../../../shared/x")
            ),
            PathBuf::from("../shared/x")
        );
        assert_eq!(
            resolve_path(Path::new("."), Path::new("dataset.csv")),
            PathBuf::from("dataset.csv")
        );
    }

    #[cfg(unix)]
    #[test]
    fn dotdot_after_a_symbolic_link_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("deep/inside");
        std::fs::create_dir_all(&real).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let cleaned = clean(&link.join("../x"));
        assert_eq!(cleaned, link.join("../x"));
        // The real parent of the link's target is where the path leads.
        std::fs::write(tmp.path().join("deep/x"), b"").unwrap();
        assert!(cleaned.exists());
    }
}
