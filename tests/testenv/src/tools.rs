//! The tools of the test environment, built from source registries and cached.
//!
//! Nothing can be downloaded prebuilt on these machines, so every server is built: Kubernetes,
//! etcd, helm, local-kms and OpenTofu from the Go module proxy (pinned by the Go modules in
//! `tests/testenv/go/`), moto from PyPI (pinned in `tests/testenv/python/requirements.txt`).
//!
//! Invariants:
//! - a tool lives in `~/.cache/shcr/testenv/<tool>-<version>/` (or `$SHCR_CACHE_DIR/testenv/…`);
//! - its `stamp` file holds a digest of everything that decides the build (module files, flags,
//!   toolchain); a different digest or a missing binary means a stale cache, which is rebuilt;
//! - builds of one tool are serialised across processes by a lock file, so parallel test
//!   binaries build once;
//! - a binary is only used after the stamp is written, which happens after a successful build.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::TestEnvError;
use crate::process::log_tail;

/// Kubernetes version of the control plane, kubectl and the version helm assumes.
pub const KUBERNETES_VERSION: &str = "v1.36.3";
/// The minimum Go that builds Kubernetes 1.36.
pub const MIN_GO: (u32, u32) = (1, 26);

/// How a tool is built.
enum Recipe {
    /// `go build` of `packages` inside the wrapper module `tests/testenv/go/<module_dir>`.
    Go {
        module_dir: &'static str,
        packages: &'static [&'static str],
        ldflags: &'static str,
    },
    /// A Python virtualenv with the pinned requirements.
    PythonVenv { requirements: &'static str },
}

/// One tool of the environment.
pub struct Tool {
    pub name: &'static str,
    pub version: &'static str,
    /// Executables the build produces (relative to the tool's cache dir).
    pub executables: &'static [&'static str],
    recipe: Recipe,
}

pub const KUBERNETES: Tool = Tool {
    name: "kubernetes",
    version: KUBERNETES_VERSION,
    executables: &[
        "bin/kube-apiserver",
        "bin/kube-controller-manager",
        "bin/kubectl",
    ],
    recipe: Recipe::Go {
        module_dir: "k8s",
        packages: &[
            "k8s.io/kubernetes/cmd/kube-apiserver",
            "k8s.io/kubernetes/cmd/kube-controller-manager",
            "k8s.io/kubernetes/cmd/kubectl",
        ],
        ldflags: "-X k8s.io/component-base/version.gitVersion=v1.36.3 \
                  -X k8s.io/component-base/version.gitMajor=1 \
                  -X k8s.io/component-base/version.gitMinor=36 \
                  -X k8s.io/component-base/version.gitTreeState=clean \
                  -X k8s.io/client-go/pkg/version.gitVersion=v1.36.3 \
                  -X k8s.io/client-go/pkg/version.gitMajor=1 \
                  -X k8s.io/client-go/pkg/version.gitMinor=36",
    },
};

pub const ETCD: Tool = Tool {
    name: "etcd",
    version: "v3.6.16",
    executables: &["bin/etcd"],
    recipe: Recipe::Go {
        module_dir: "etcd",
        packages: &["."],
        ldflags: "",
    },
};

pub const HELM: Tool = Tool {
    name: "helm",
    version: "v3.22.0",
    executables: &["bin/helm"],
    recipe: Recipe::Go {
        module_dir: "helm",
        packages: &["helm.sh/helm/v3/cmd/helm"],
        ldflags: "-X helm.sh/helm/v3/internal/version.version=v3.22.0 \
                  -X helm.sh/helm/v3/internal/version.gitTreeState=clean \
                  -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 \
                  -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=36 \
                  -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 \
                  -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=36",
    },
};

pub const LOCAL_KMS: Tool = Tool {
    name: "local-kms",
    version: "v0.0.0-20260228092603-2a5e92d09ab6",
    executables: &["bin/local-kms"],
    recipe: Recipe::Go {
        module_dir: "localkms",
        packages: &["github.com/nsmithuk/local-kms"],
        ldflags: "",
    },
};

/// OpenTofu, to check the Terraform modules under `terraform/` (`tofu fmt`, `tofu validate`).
/// `version.dev=no` is what OpenTofu's release build sets, so `tofu version` prints `1.12.6`.
pub const TOFU: Tool = Tool {
    name: "tofu",
    version: "v1.12.6",
    executables: &["bin/tofu"],
    recipe: Recipe::Go {
        module_dir: "tofu",
        packages: &["github.com/opentofu/opentofu/cmd/tofu"],
        ldflags: "-X github.com/opentofu/opentofu/version.dev=no",
    },
};

pub const MOTO: Tool = Tool {
    name: "moto",
    version: "5.2.5",
    executables: &["venv/bin/moto_server"],
    recipe: Recipe::PythonVenv {
        requirements: "requirements.txt",
    },
};

/// Every tool, in the order `prepare` builds them (cheapest first).
pub const ALL: &[&Tool] = &[&MOTO, &LOCAL_KMS, &ETCD, &HELM, &TOFU, &KUBERNETES];

/// `~/.cache/shcr` (or `$SHCR_CACHE_DIR`).
pub fn cache_root() -> Result<PathBuf, TestEnvError> {
    if let Some(dir) = std::env::var_os("SHCR_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").ok_or_else(|| {
        TestEnvError::Io("HOME is not set; set SHCR_CACHE_DIR to a cache directory".into())
    })?;
    Ok(PathBuf::from(home).join(".cache").join("shcr"))
}

/// `tests/testenv` in this checkout (where the pinned module files live).
pub fn testenv_source_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

impl Tool {
    pub fn dir(&self) -> Result<PathBuf, TestEnvError> {
        Ok(cache_root()?
            .join("testenv")
            .join(format!("{}-{}", self.name, self.version)))
    }

    /// Path of one of this tool's executables (by file name), building the tool if needed.
    pub fn executable(&self, file_name: &str) -> Result<PathBuf, TestEnvError> {
        let dir = self.ensure_built()?;
        let rel = self
            .executables
            .iter()
            .find(|e| e.rsplit('/').next() == Some(file_name))
            .ok_or_else(|| {
                TestEnvError::Io(format!("tool {} has no executable {file_name}", self.name))
            })?;
        Ok(dir.join(rel))
    }

    /// Builds the tool unless a fresh build is cached; returns its cache dir.
    pub fn ensure_built(&self) -> Result<PathBuf, TestEnvError> {
        let dir = self.dir()?;
        let want = self.digest()?;
        if self.is_fresh(&dir, &want) {
            return Ok(dir);
        }
        fs::create_dir_all(&dir)
            .map_err(|e| TestEnvError::Io(format!("creating {}: {e}", dir.display())))?;
        let lock = File::create(dir.with_extension("lock"))
            .map_err(|e| TestEnvError::Io(format!("creating the build lock: {e}")))?;
        lock.lock()
            .map_err(|e| TestEnvError::Io(format!("locking the build of {}: {e}", self.name)))?;
        // Another process may have finished the build while we waited for the lock.
        if self.is_fresh(&dir, &want) {
            return Ok(dir);
        }
        let stamp = dir.join("stamp");
        let reason = if stamp.exists() {
            "cache is stale (its pinned sources or flags changed)"
        } else {
            "not cached yet"
        };
        eprintln!(
            "shcr-testenv: building {} {} ({reason}) into {} — a cold build can take minutes",
            self.name,
            self.version,
            dir.display()
        );
        let _ = fs::remove_file(&stamp);
        let started = Instant::now();
        match &self.recipe {
            Recipe::Go {
                module_dir,
                packages,
                ldflags,
            } => self.build_go(&dir, module_dir, packages, ldflags)?,
            Recipe::PythonVenv { requirements } => self.build_venv(&dir, requirements)?,
        }
        for exe in self.executables {
            if !dir.join(exe).is_file() {
                return Err(TestEnvError::BuildFailed {
                    tool: self.name.to_string(),
                    log_tail: format!("the build succeeded but did not produce {exe}"),
                });
            }
        }
        fs::write(&stamp, &want)
            .map_err(|e| TestEnvError::Io(format!("writing {}: {e}", stamp.display())))?;
        eprintln!(
            "shcr-testenv: built {} {} in {:.0?}",
            self.name,
            self.version,
            started.elapsed()
        );
        Ok(dir)
    }

    fn is_fresh(&self, dir: &Path, want: &str) -> bool {
        fs::read_to_string(dir.join("stamp")).is_ok_and(|have| have == want)
            && self.executables.iter().all(|e| dir.join(e).is_file())
    }

    /// Digest of every input that decides the build.
    fn digest(&self) -> Result<String, TestEnvError> {
        let mut hasher = Sha256::new();
        hasher.update(self.name.as_bytes());
        hasher.update(self.version.as_bytes());
        match &self.recipe {
            Recipe::Go {
                module_dir,
                packages,
                ldflags,
            } => {
                let module = testenv_source_dir().join("go").join(module_dir);
                for file in ["go.mod", "go.sum"] {
                    hasher.update(read_input(&module.join(file))?);
                }
                hasher.update(packages.join(" ").as_bytes());
                hasher.update(ldflags.as_bytes());
                hasher.update(go_version()?.as_bytes());
            }
            Recipe::PythonVenv { requirements } => {
                hasher.update(read_input(
                    &testenv_source_dir().join("python").join(requirements),
                )?);
            }
        }
        Ok(format!("{:x}", hasher.finalize()))
    }

    fn build_go(
        &self,
        dir: &Path,
        module_dir: &str,
        packages: &[&str],
        ldflags: &str,
    ) -> Result<(), TestEnvError> {
        let module = testenv_source_dir().join("go").join(module_dir);
        let bin = dir.join("bin");
        fs::create_dir_all(&bin)
            .map_err(|e| TestEnvError::Io(format!("creating {}: {e}", bin.display())))?;
        let ldflags = format!(
            "-s -w {}",
            ldflags.split_whitespace().collect::<Vec<_>>().join(" ")
        );
        let mut cmd = Command::new("go");
        cmd.current_dir(&module)
            .env("CGO_ENABLED", "0")
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "-mod=mod")
            .args(["build", "-trimpath", "-ldflags", &ldflags, "-o"]);
        if packages.len() == 1 {
            cmd.arg(bin.join(self.executables[0].rsplit('/').next().unwrap_or(self.name)));
        } else {
            // `-o dir/` puts each command under its own name.
            cmd.arg(format!("{}/", bin.display()));
        }
        cmd.args(packages);
        run_logged(self.name, cmd, &dir.join("build.log"))
    }

    fn build_venv(&self, dir: &Path, requirements: &str) -> Result<(), TestEnvError> {
        let venv = dir.join("venv");
        let log = dir.join("build.log");
        let python = find_python()?;
        let _ = fs::remove_dir_all(&venv);
        let mut create = Command::new(&python);
        create.arg("-m").arg("venv").arg(&venv);
        run_logged(self.name, create, &log)?;
        let mut install = Command::new(venv.join("bin").join("pip"));
        install
            .args(["install", "--disable-pip-version-check", "--quiet", "-r"])
            .arg(testenv_source_dir().join("python").join(requirements));
        run_logged(self.name, install, &dir.join("pip.log"))
    }
}

fn read_input(path: &Path) -> Result<Vec<u8>, TestEnvError> {
    fs::read(path).map_err(|e| {
        TestEnvError::Io(format!(
            "reading {} (part of the pinned test environment): {e}",
            path.display()
        ))
    })
}

fn run_logged(tool: &str, mut cmd: Command, log_path: &Path) -> Result<(), TestEnvError> {
    let log = File::create(log_path)
        .map_err(|e| TestEnvError::Io(format!("creating {}: {e}", log_path.display())))?;
    let log_err = log
        .try_clone()
        .map_err(|e| TestEnvError::Io(format!("cloning log handle: {e}")))?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .status()
        .map_err(|e| TestEnvError::Spawn {
            name: tool.to_string(),
            program: format!("{:?}", cmd.get_program()),
            reason: e.to_string(),
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(TestEnvError::BuildFailed {
            tool: tool.to_string(),
            log_tail: format!(
                "{}\n(full log: {})",
                log_tail(log_path, 40),
                log_path.display()
            ),
        })
    }
}

/// `go version`, checked against [`MIN_GO`].
pub fn go_version() -> Result<String, TestEnvError> {
    let output = Command::new("go")
        .arg("version")
        .env("GOTOOLCHAIN", "local")
        .output()
        .map_err(|_| TestEnvError::GoMissing)?;
    let text = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let found = parse_go_version(&text).ok_or_else(|| TestEnvError::GoTooOld {
        found: text.clone(),
    })?;
    if found < MIN_GO {
        return Err(TestEnvError::GoTooOld { found: text });
    }
    Ok(text)
}

/// `(major, minor)` from `go version go1.26.8 linux/amd64`.
fn parse_go_version(text: &str) -> Option<(u32, u32)> {
    let version = text.split_whitespace().nth(2)?.strip_prefix("go")?;
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()?;
    Some((major, minor))
}

fn find_python() -> Result<PathBuf, TestEnvError> {
    for candidate in ["python3", "python"] {
        if Command::new(candidate)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Ok(PathBuf::from(candidate));
        }
    }
    Err(TestEnvError::Io(
        "python3 not found on PATH: the test environment's S3 server (moto) needs Python ≥ 3.9"
            .into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_build_shows_the_tail_of_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "for i in $(seq 1 100); do echo line $i; done; echo 'undefined: foo' >&2; exit 1",
        ]);
        let err = run_logged("widget", cmd, &dir.path().join("build.log")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("building widget for the test environment failed"),
            "{text}"
        );
        assert!(text.contains("undefined: foo"), "{text}");
        assert!(
            text.contains("line 100") && !text.contains("line 10\n"),
            "{text}"
        );
        assert!(text.contains("full log:"), "{text}");
    }

    #[test]
    fn a_changed_pin_makes_the_cache_stale() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        std::fs::write(dir.path().join("bin/etcd"), b"").unwrap();
        std::fs::write(dir.path().join("stamp"), "old-digest").unwrap();
        assert!(!ETCD.is_fresh(dir.path(), "new-digest"));
        assert!(ETCD.is_fresh(dir.path(), "old-digest"));
        std::fs::remove_file(dir.path().join("bin/etcd")).unwrap();
        assert!(
            !ETCD.is_fresh(dir.path(), "old-digest"),
            "a missing binary is stale"
        );
    }

    #[test]
    fn go_versions_parse() {
        assert_eq!(
            parse_go_version("go version go1.26.8 linux/amd64"),
            Some((1, 26))
        );
        assert_eq!(
            parse_go_version("go version go1.27rc1 linux/amd64"),
            Some((1, 27))
        );
        assert_eq!(parse_go_version("go version devel"), None);
        assert!(parse_go_version("go version go1.25.3 linux/amd64").unwrap() < MIN_GO);
    }
}
