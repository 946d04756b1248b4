//! The TOML file (`--config`) and its merge with `--vm` flags.
use super::{ConfigError, VmDesc};
use engine::config::VmConfig;
use serde::Deserialize;

/// Settings of the whole engine from the config file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `backend = "auto" | "uring" | "portable"`.
    pub backend: Option<String>,
    /// The `[[vm]]` tables.
    #[serde(default, rename = "vm")]
    pub vms: Vec<VmDesc>,
}

/// Reads a TOML config file's text. An error names the line and the key.
pub fn parse_file(text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e: toml::de::Error| {
        let msg = e.message().lines().next().unwrap_or("invalid TOML").to_string();
        let Some(start) = e.span().map(|s| s.start.min(text.len())) else { return ConfigError::File(msg) };
        let line = text.get(..start).map_or(0, |t| t.matches('\n').count()) + 1;
        // The key of the offending line, when it has one.
        let key = text.lines().nth(line - 1).and_then(|l| l.split_once('=')).map(|(k, _)| k.trim());
        ConfigError::File(match key {
            Some(k) if !k.is_empty() && !k.starts_with('[') => format!("line {line} ({k}): {msg}"),
            _ => format!("line {line}: {msg}"),
        })
    })
}

/// Merges the file's VMs with `--vm` flags: a flag naming a file VM overrides its keys (its
/// `consumer` keys replace the file's); other flags add VMs. Names must be unique: in the file,
/// among the flags (two flags for one VM are refused, not merged), and after the merge.
pub fn merge(file: &[VmDesc], flags: &[VmDesc]) -> Result<Vec<VmConfig>, ConfigError> {
    let mut all: Vec<VmDesc> = file.to_vec();
    for (i, flag) in flags.iter().enumerate() {
        if let Some(name) = flag.name.as_ref().filter(|n| flags[..i].iter().any(|o| o.name.as_ref() == Some(*n))) {
            return Err(ConfigError::Duplicate(name.clone()));
        }
        match all.iter_mut().find(|d| flag.name.is_some() && d.name == flag.name) {
            Some(base) => *base = std::mem::take(base).overlay(flag),
            None => all.push(flag.clone()),
        }
    }
    let vms = all.iter().map(VmDesc::validate).collect::<Result<Vec<_>, _>>()?;
    for (i, vm) in vms.iter().enumerate() {
        if vms.iter().take(i).any(|o| o.name == vm.name) {
            return Err(ConfigError::Duplicate(vm.name.clone()));
        }
        if vms.iter().take(i).any(|o| o.handle.same_place(&vm.handle)) {
            return Err(ConfigError::SharedHandle { vm: vm.name.clone(), handle: vm.handle.to_string() });
        }
    }
    Ok(vms)
}
