//! `omerta-mkinitramfs DIR OUT`: packs the tree at DIR into an uncompressed newc initramfs.
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(dir), Some(out)) = (args.first(), args.get(1)) else {
        eprintln!("usage: omerta-mkinitramfs DIR OUT");
        return ExitCode::from(2);
    };
    let run = || -> std::io::Result<()> {
        let entries = hv::initramfs::tree(std::path::Path::new(dir))?;
        let mut f = std::io::BufWriter::new(std::fs::File::create(out)?);
        hv::initramfs::write(&mut f, &entries)?;
        std::io::Write::flush(&mut f)
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("omerta-mkinitramfs: {e}");
            ExitCode::from(1)
        }
    }
}
