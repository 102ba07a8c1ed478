//! The FOAM files of one application's checkpoint (`<app>/mem/`): one per address space, named
//! `<pid>` for a task and `shmem-<id>` for shared memory.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::direct::DirectRegion;
use crate::foam::{DirectWrites, FileMode, FoamFile, WriteMode};
use crate::protocol::Target;
use crate::Error;

pub struct Spaces {
    dir: PathBuf,
    mode: FileMode,
    writable: bool,
    write: WriteMode,
    direct: Option<Arc<DirectRegion>>,
    files: Mutex<BTreeMap<Target, Arc<FoamFile>>>,
}

impl Spaces {
    /// Creates (or reopens for another pass) the directory, root-only; its files are written as
    /// [`WriteMode::probe`] finds best there, directly into rpramfs's region unless `direct` is off.
    pub fn create(dir: &Path, mode: FileMode, direct: DirectWrites) -> Result<Spaces, Error> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| Error::io(dir, e))?;
        let (write, region) = WriteMode::probe_with_region(dir, direct);
        let direct = region.map(Arc::new);
        Ok(Spaces { dir: dir.into(), mode, writable: true, write, direct, files: Mutex::new(BTreeMap::new()) })
    }

    /// Opens for reading, straight out of rpramfs's region where it offers that.
    pub fn open(dir: &Path, mode: FileMode) -> Spaces {
        let direct = DirectRegion::probe(dir).map(Arc::new);
        Spaces { dir: dir.into(), mode, writable: false, write: WriteMode::default(), direct, files: Mutex::new(BTreeMap::new()) }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The address space's file, opened once.
    pub fn get_or_create(&self, t: Target) -> Result<Arc<FoamFile>, Error> {
        let mut files = self.files.lock();
        if let Some(f) = files.get(&t) {
            return Ok(f.clone());
        }
        let f = Arc::new(if self.writable {
            FoamFile::create(&self.dir, &t.stem(), self.mode)?.with_write_mode(self.write).with_direct(self.direct.clone())
        } else {
            FoamFile::open(&self.dir, &t.stem(), self.mode)?.with_direct(self.direct.clone())
        });
        files.insert(t, f.clone());
        Ok(f)
    }

    /// Address spaces with files in the directory.
    pub fn existing(&self) -> Result<Vec<Target>, Error> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))? {
            let e = e.map_err(|e| Error::io(&self.dir, e))?;
            if let Some(t) = e.file_name().to_str().and_then(|n| n.strip_suffix(".crc")).and_then(Target::from_stem) {
                out.push(t);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Deletes an address space the last dump no longer names (an exited task, an unmapped object).
    pub fn remove(&self, t: Target) -> Result<(), Error> {
        let f = self.get_or_create(t)?;
        for p in f.data_paths() {
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        }
        let crc = self.dir.join(format!("{}.crc", t.stem()));
        std::fs::remove_file(&crc).map_err(|e| Error::io(&crc, e))?;
        self.files.lock().remove(&t);
        Ok(())
    }
}
