//! Writing initramfs archives: cpio "newc", uncompressed (the kernel accepts it as is, and
//! several archives one after the other: a base image plus a per-test `/test.sh`).
#![forbid(unsafe_code)]

use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// One entry of an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A directory.
    Dir {
        /// Path without a leading slash.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// A regular file.
    File {
        /// Path without a leading slash.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Contents.
        data: Vec<u8>,
    },
    /// A symbolic link.
    Symlink {
        /// Path without a leading slash.
        path: String,
        /// Target.
        target: String,
    },
}

fn header(out: &mut impl Write, ino: u32, mode: u32, size: usize, name: &str) -> io::Result<()> {
    let namesize = name.len() + 1;
    let size = u32::try_from(size).map_err(|_| io::Error::other("file larger than 4 GiB"))?;
    write!(
        out,
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
        0, 0, 1, 0, 0, 0, 0, 0, 0
    )?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    pad(out, 110 + namesize)
}

fn pad(out: &mut impl Write, len: usize) -> io::Result<()> {
    out.write_all(&[0u8; 3][..(4 - len % 4) % 4])
}

/// Writes `entries` as a newc archive, with its trailer.
pub fn write(out: &mut impl Write, entries: &[Entry]) -> io::Result<()> {
    for (i, e) in entries.iter().enumerate() {
        let ino = u32::try_from(i + 1).unwrap_or(u32::MAX);
        match e {
            Entry::Dir { path, mode } => header(out, ino, 0o040_000 | mode, 0, path)?,
            Entry::File { path, mode, data } => {
                header(out, ino, 0o100_000 | mode, data.len(), path)?;
                out.write_all(data)?;
                pad(out, data.len())?;
            }
            Entry::Symlink { path, target } => {
                header(out, ino, 0o120_777, target.len(), path)?;
                out.write_all(target.as_bytes())?;
                pad(out, target.len())?;
            }
        }
    }
    header(out, 0, 0, 0, "TRAILER!!!")
}

/// The entries of the directory tree at `root` (paths relative to it), parents first.
pub fn tree(root: &Path) -> io::Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut children: Vec<_> = std::fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
        children.sort_by_key(std::fs::DirEntry::file_name);
        for c in children {
            let p = c.path();
            let rel = p.strip_prefix(root).map_err(io::Error::other)?.to_string_lossy().into_owned();
            let meta = std::fs::symlink_metadata(&p)?;
            let mode = meta.mode() & 0o7777;
            if meta.file_type().is_symlink() {
                out.push(Entry::Symlink { path: rel, target: std::fs::read_link(&p)?.to_string_lossy().into_owned() });
            } else if meta.is_dir() {
                out.push(Entry::Dir { path: rel, mode });
                stack.push(p);
            } else {
                out.push(Entry::File { path: rel, mode: meta.permissions().mode() & 0o7777, data: std::fs::read(&p)? });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut v = Vec::new();
        write(&mut v, &[Entry::File { path: "test.sh".into(), mode: 0o755, data: b"echo hi\n".to_vec() }]).unwrap();
        assert!(v.starts_with(b"070701"));
        assert_eq!(v.len() % 4, 0);
        let text = String::from_utf8_lossy(&v);
        assert!(text.contains("test.sh\0") && text.contains("echo hi") && text.contains("TRAILER!!!"));
        // mode field: regular file 0755.
        assert_eq!(&v[14..22], b"000081ed");
    }
}
