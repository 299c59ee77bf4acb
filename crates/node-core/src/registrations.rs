//! Services registered through the API, kept in a file so that they
//! survive a restart (graceful or not), as Consul's agent keeps the
//! services registered through its HTTP API in its data directory.
//!
//! The file (`<data_dir>/services.json` for `ollamacron-node run`) holds
//! `{"format": 1, "services": [...]}`, every service as
//! `GET /v1/services/local` shows it. Each change rewrites it whole: to a
//! temporary file beside it, flushed to disk, renamed over the old one,
//! and the directory flushed too, so a crash leaves the old file or the
//! new one, never a mix. A file that cannot be read or parsed stops the
//! node's start with an error naming it: registrations are never dropped
//! silently.
//!
//! ```
//! use ollamacron_node_core::RegistrationFile;
//! use ollamacron_node_core::registry::ServiceInfo;
//!
//! let dir = tempfile::tempdir()?;
//! let file = RegistrationFile::new(dir.path().join("services.json"));
//! assert!(file.load()?.is_empty(), "no file yet: nothing registered");
//! let service = ServiceInfo { id: "llama3:8b".into(), name: "llama3:8b".into(),
//!     service_type: "llm".into(), ..ServiceInfo::default() };
//! file.store(std::slice::from_ref(&service))?;
//! assert_eq!(file.load()?, vec![service]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use ollamacron_service_registry::ServiceInfo;
use serde::{Deserialize, Serialize};

/// Numbers the temporary files of this process's writes.
static NEXT_TEMPORARY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The file format this build writes and reads.
const FORMAT: u32 = 1;
/// Largest registration file read, in bytes: far beyond what a record
/// can hold (its services are bounded by the record limits).
const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Why the registration file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// The file exists but cannot be read.
    #[error("cannot read the registered services at {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a registration file of this format.
    #[error("the registered services at {} are unreadable: {reason}; fix or remove the file (its services are then gone)", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A service of the file cannot be offered (the record refuses it).
    #[error("the registered service `{id}` at {} cannot be offered: {reason}; fix or remove the file", path.display())]
    Refused {
        /// The file.
        path: PathBuf,
        /// The service's id.
        id: String,
        /// Why the record refuses it.
        reason: String,
    },
    /// The file could not be written.
    #[error("cannot save the registered services to {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileContents {
    format: u32,
    services: Vec<ServiceInfo>,
}

/// Where a node keeps the services registered through its API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationFile {
    path: PathBuf,
}

impl RegistrationFile {
    /// The registration file at `path` (it need not exist yet).
    #[must_use]
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The file's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The services the file holds; none when there is no file.
    ///
    /// # Errors
    /// The file exists but cannot be read, is too large, or is not a
    /// registration file of this format (each error names the file).
    pub fn load(&self) -> Result<Vec<ServiceInfo>, RegistrationError> {
        let read_err = |source| RegistrationError::Read {
            path: self.path.clone(),
            source,
        };
        let corrupt = |reason: String| RegistrationError::Corrupt {
            path: self.path.clone(),
            reason,
        };
        let meta = match std::fs::metadata(&self.path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(read_err(e)),
        };
        if !meta.is_file() {
            return Err(corrupt("it is not a regular file".to_owned()));
        }
        if meta.len() > MAX_FILE_BYTES {
            return Err(corrupt(format!(
                "it has {} bytes, more than the {MAX_FILE_BYTES} a registration file may have",
                meta.len()
            )));
        }
        let bytes = std::fs::read(&self.path).map_err(read_err)?;
        let contents: FileContents = serde_json::from_slice(&bytes)
            .map_err(|e| corrupt(format!("not a registration file: {e}")))?;
        if contents.format != FORMAT {
            return Err(corrupt(format!(
                "format {} is not {FORMAT}, the one this version reads",
                contents.format
            )));
        }
        if let Some(s) = contents.services.iter().find(|s| s.id.is_empty()) {
            return Err(corrupt(format!("the service named `{}` has no id", s.name)));
        }
        Ok(contents.services)
    }

    /// Replace the file's services with `services`, durably: when this
    /// returns, a crash keeps them.
    ///
    /// # Errors
    /// The directory cannot be created or the file written (the old file,
    /// if any, is then left as it was).
    pub fn store(&self, services: &[ServiceInfo]) -> Result<(), RegistrationError> {
        let write_err = |source| RegistrationError::Write {
            path: self.path.clone(),
            source,
        };
        let contents = FileContents {
            format: FORMAT,
            services: services.to_vec(),
        };
        let bytes = serde_json::to_vec_pretty(&contents)
            .map_err(|e| write_err(std::io::Error::other(e)))?;
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or_else(|| Path::new("."));
        std::fs::create_dir_all(dir).map_err(write_err)?;
        let name = self
            .path
            .file_name()
            .map_or_else(|| "services.json".into(), |n| n.to_string_lossy());
        // Unique to this write, so that no two writes share a temporary file.
        let unique = NEXT_TEMPORARY.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.tmp.{}.{unique}", std::process::id()));
        let written = std::fs::File::create(&tmp)
            .and_then(|mut file| {
                file.write_all(&bytes)?;
                file.write_all(b"\n")?;
                file.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(write_err(e));
        }
        // The rename is durable once the directory is.
        sync_dir(dir).map_err(write_err)
    }
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_: &Path) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(id: &str) -> ServiceInfo {
        ServiceInfo {
            id: id.to_owned(),
            name: id.to_owned(),
            service_type: "llm".to_owned(),
            ..ServiceInfo::default()
        }
    }

    #[test]
    fn stores_replace_the_whole_file_and_leave_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = RegistrationFile::new(dir.path().join("nested").join("services.json"));
        file.store(&[service("a"), service("b")]).unwrap();
        assert_eq!(file.load().unwrap(), vec![service("a"), service("b")]);
        file.store(&[service("b")]).unwrap();
        assert_eq!(file.load().unwrap(), vec![service("b")]);
        file.store(&[]).unwrap();
        assert!(file.load().unwrap().is_empty());
        let names: Vec<String> = std::fs::read_dir(dir.path().join("nested"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["services.json".to_owned()]);
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it_and_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("services.json");
        let file = RegistrationFile::new(&path);
        for (bytes, says) in [
            (
                &b"{\"format\": 1, \"services\": [{\"id\": "[..],
                "not a registration file",
            ),
            (b"\xff\xfe", "not a registration file"),
            (b"{\"format\": 2, \"services\": []}", "format 2 is not 1"),
            (
                b"{\"format\": 1, \"services\": [], \"x\": 1}",
                "unknown field",
            ),
            (
                b"{\"format\": 1, \"services\": [{\"id\": \"\", \"name\": \"n\"}]}",
                "has no id",
            ),
        ] {
            std::fs::write(&path, bytes).unwrap();
            let e = file.load().unwrap_err().to_string();
            assert!(e.contains(&path.display().to_string()), "{e}");
            assert!(e.contains(says), "{e}");
            assert_eq!(std::fs::read(&path).unwrap(), bytes, "the file is kept");
        }
    }

    #[test]
    fn a_directory_in_its_place_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = RegistrationFile::new(dir.path());
        assert!(
            file.load()
                .unwrap_err()
                .to_string()
                .contains("not a regular file")
        );
        assert!(matches!(
            file.store(&[service("a")]),
            Err(RegistrationError::Write { .. })
        ));
    }
}
