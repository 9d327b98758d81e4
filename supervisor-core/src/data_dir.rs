//! The server's own files (`server.dataDir`, `--data-dir`): the control socket, the `file` and
//! `sqlite` stores unless configured elsewhere, and the jail stage.
//!
//! They hold every conversation, so nothing here is for anyone else: directories are created
//! 0700 and files 0600 whatever the umask (a mode given at creation can only lose bits to the
//! umask, never gain them). Stores configured outside the data directory get the same modes.

use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of every directory the server creates for its data.
pub(crate) const DIR_MODE: u32 = 0o700;
/// Mode of every data file the server creates.
pub(crate) const FILE_MODE: u32 = 0o600;

#[derive(Debug, thiserror::Error)]
#[error("could not prepare the data directory {path}: {source}")]
pub struct DataDirError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Creates the data directory (0700) if needed, tightens one left more open by an older
/// version, and returns its absolute path: workers are given paths inside it (the jail stage)
/// and must not depend on the working directory.
///
/// # Errors
/// It cannot be created, is not a directory, or its mode cannot be set.
pub fn prepare(path: &Path) -> Result<PathBuf, DataDirError> {
    let fail = |source| DataDirError {
        path: path.to_owned(),
        source,
    };
    create_dir_all(path).map_err(fail)?;
    let path = std::fs::canonicalize(path).map_err(fail)?;
    let meta = std::fs::metadata(&path).map_err(fail)?;
    if !meta.is_dir() {
        return Err(fail(std::io::Error::other("not a directory")));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::info!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o7777), "data directory was open to others; setting it to 0700");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(DIR_MODE)).map_err(
            |source| DataDirError {
                path: path.clone(),
                source,
            },
        )?;
    }
    Ok(path)
}

/// `mkdir -p` with every directory it creates 0700; existing ones are left as they are.
///
/// # Errors
/// As [`DirBuilder::create`].
pub(crate) fn create_dir_all(path: &Path) -> std::io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
}

/// Options that create a file 0600; the caller adds read, write, create or truncate.
pub(crate) fn file_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.mode(FILE_MODE);
    options
}

/// Sets an existing data file to 0600 if it is open to others (a store written by an older
/// version); a missing file is fine.
///
/// # Errors
/// The file exists but its mode cannot be read or set.
pub(crate) fn tighten_file(path: &Path) -> std::io::Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.permissions().mode() & 0o077 != 0 => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(FILE_MODE))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The umask is process-wide, so the tests that change it run in one test function.
    #[test]
    fn modes_hold_whatever_the_umask() {
        use nix::sys::stat::{Mode, umask};
        let dir = tempfile::tempdir().unwrap();
        for (i, mask) in [0o000, 0o022].into_iter().enumerate() {
            let old = umask(Mode::from_bits_truncate(mask));
            let data = dir.path().join(format!("d{i}/nested/data"));
            let prepared = prepare(&data).unwrap();
            let file = prepared.join("f");
            file_options().write(true).create(true).open(&file).unwrap();
            umask(old);
            assert!(prepared.is_absolute());
            for created in [dir.path().join(format!("d{i}")), prepared.clone()] {
                let mode = std::fs::metadata(&created).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o700, "{created:?} under umask {mask:o}");
            }
            let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "file under umask {mask:o}");
        }
    }

    #[test]
    fn an_open_directory_and_file_are_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        let file = data.join("sessions.db");
        std::fs::write(&file, b"").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        prepare(&data).unwrap();
        tighten_file(&file).unwrap();
        tighten_file(&data.join("missing")).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&data), mode(&file)), (0o700, 0o600));
    }
}
