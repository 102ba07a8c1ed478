//! A checkpoint store: a directory of checkpoints, each `<store>/<id>/` with its manifest and one
//! directory per app (`<app>/criu/<pass>/` for CRIU's images, `<app>/mem/` for FOAM files).
//! Ids are `<sequence>-<name>` so they sort by age. Everything is root-only (0700/0600): the
//! files hold process memory.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::manifest::Manifest;
use crate::Error;

/// A checkpoint id and its manifest, or why the manifest cannot be read.
pub type Listed = (String, Result<Manifest, Error>);

pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens the store, creating its directory (0700) when missing.
    pub fn open(root: &Path) -> Result<Store, Error> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(root).map_err(|e| Error::io(root, e))?;
        let meta = std::fs::metadata(root).map_err(|e| Error::io(root, e))?;
        if !meta.is_dir() {
            return Err(Error::io(root, std::io::Error::from(std::io::ErrorKind::NotADirectory)));
        }
        Ok(Store { root: root.into() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the directory of a new checkpoint.
    pub fn create_checkpoint(&self, name: &str) -> Result<(String, PathBuf), Error> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(Error::Unsupported(format!("checkpoint name {name:?}: use letters, digits, '-', '_' and '.'")));
        }
        let next = self.ids()?.iter().filter_map(|id| id.split('-').next()?.parse::<u32>().ok()).max().unwrap_or(0) + 1;
        let id = format!("{next:04}-{name}");
        let dir = self.root.join(&id);
        std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(|e| Error::io(&dir, e))?;
        // The mode asked for is filtered by the umask; make sure it is what it must be.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| Error::io(&dir, e))?;
        Ok((id, dir))
    }

    /// Checkpoint ids, oldest first.
    pub fn ids(&self) -> Result<Vec<String>, Error> {
        let mut ids: Vec<String> = std::fs::read_dir(&self.root)
            .map_err(|e| Error::io(&self.root, e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.split('-').next().is_some_and(|s| s.len() >= 4 && s.parse::<u32>().is_ok()))
            .collect();
        ids.sort();
        Ok(ids)
    }

    pub fn dir_of(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Every checkpoint with its manifest or the reason it cannot be read.
    pub fn list(&self) -> Result<Vec<Listed>, Error> {
        Ok(self.ids()?.into_iter().map(|id| {
            let m = Manifest::load(&self.root.join(&id));
            (id, m)
        }).collect())
    }

    /// The checkpoint to restore: `id` if given (a full id such as `0002-second`, or the name given
    /// at checkpoint, `second`: then the newest complete checkpoint of that name), else the newest
    /// complete one.
    pub fn pick(&self, id: Option<&str>) -> Result<(PathBuf, Manifest), Error> {
        if let Some(id) = id {
            let dir = self.root.join(id);
            if dir.is_dir() && !id.contains('/') {
                let m = Manifest::load(&dir)?;
                return Ok((dir, m));
            }
            let named: Vec<Listed> = self.list()?.into_iter().filter(|(i, _)| i.split_once('-').is_some_and(|(_, n)| n == id)).collect();
            if let Some((i, m)) = named.iter().rev().find(|(_, m)| m.as_ref().is_ok_and(Manifest::restorable)) {
                return Ok((self.root.join(i), m.as_ref().expect("restorable").clone()));
            }
            let lists = format!("kup inspect {} lists them", self.root.display());
            return Err(Error::NoCheckpoint(if named.is_empty() {
                format!("no checkpoint {id:?} in {} ({lists})", self.root.display())
            } else {
                let ids: Vec<&str> = named.iter().map(|(i, _)| i.as_str()).collect();
                format!("no complete checkpoint named {id:?} in {}: {} failed, were interrupted or cannot be read ({lists})", self.root.display(), ids.join(", "))
            }));
        }
        for (id, m) in self.list()?.into_iter().rev() {
            match m {
                Ok(m) if m.restorable() => return Ok((self.root.join(id), m)),
                // Failed or interrupted attempts: the apps were left running; an older one may do.
                Ok(_) => continue,
                // Never fall back silently past a damaged record to older state.
                Err(e) => {
                    return Err(Error::NoCheckpoint(format!(
                        "the newest checkpoint, {id}, cannot be read ({e}); to restore an older one on purpose, name it with --checkpoint (kup inspect {} lists them)",
                        self.root.display()
                    )))
                }
            }
        }
        Err(Error::NoCheckpoint(format!("no complete checkpoint in {} (kup inspect {} lists them)", self.root.display(), self.root.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::foam::FileMode;
    use crate::manifest::{State, MANIFEST_VERSION};

    fn checkpoint(store: &Store, name: &str, state: State) -> String {
        let (id, dir) = store.create_checkpoint(name).unwrap();
        let m = Manifest {
            version: MANIFEST_VERSION,
            id: id.clone(),
            name: name.into(),
            state,
            created_unix_ms: 1,
            finished_unix_ms: None,
            kernel: "6.1.0-56-cloud-amd64".into(),
            criu_version: "4.1.1".into(),
            file_mode: FileMode::Single,
            incremental: false,
            apps: vec![],
        };
        m.save(&dir).unwrap();
        id
    }

    #[test]
    fn a_checkpoint_is_found_by_its_id_or_by_its_name() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let first = checkpoint(&store, "second", State::Complete);
        let other = checkpoint(&store, "memcached", State::Complete);
        assert_eq!(store.pick(None).unwrap().1.id, other, "the newest complete one");
        assert_eq!(store.pick(Some(&first)).unwrap().1.id, first, "by its full id");
        assert_eq!(store.pick(Some("second")).unwrap().1.id, first, "by its name");
        // The newest complete checkpoint of the name; a failed newer one is passed over.
        let newer = checkpoint(&store, "second", State::Complete);
        checkpoint(&store, "second", State::Failed("criu dump failed".into()));
        assert_eq!(store.pick(Some("second")).unwrap().1.id, newer);
        let none = store.pick(Some("third")).unwrap_err().to_string();
        assert!(none.contains("no checkpoint \"third\"") && none.contains("kup inspect"), "{none}");
        let failed = checkpoint(&store, "broken", State::Failed("criu dump failed".into()));
        let e = store.pick(Some("broken")).unwrap_err().to_string();
        assert!(e.contains("no complete checkpoint named \"broken\"") && e.contains(&failed), "{e}");
        assert!(store.pick(Some("../x")).is_err());
    }
}
