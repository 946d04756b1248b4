//! The reply line: `{"ok":true,"result":...}` or `{"ok":false,"code":"...","error":"..."}`,
//! one JSON object a line.
use serde_json::{json, Value};

use crate::error::{ErrorCode, Failure};
use crate::reply::Reply;

/// Encodes a reply line (no newline).
pub fn encode(reply: &Result<Reply, Failure>) -> String {
    match reply {
        Ok(r) => json!({"ok": true, "result": r.to_json()}).to_string(),
        Err(f) => json!({"ok": false, "code": f.code.as_str(), "error": f.message}).to_string(),
    }
}

/// Decodes a reply line into its untyped result or the engine's refusal: for [`crate::Client`]
/// and for tests of the JSON form itself.
pub fn decode(line: &str) -> Result<Result<Value, Failure>, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("the engine sent a reply that is not JSON: {e}"))?;
    match v.get("ok").and_then(Value::as_bool) {
        Some(true) => Ok(Ok(v.get("result").cloned().unwrap_or(Value::Null))),
        Some(false) => {
            let code = v.get("code").and_then(Value::as_str).and_then(ErrorCode::parse).unwrap_or(ErrorCode::Internal);
            let msg = v.get("error").and_then(Value::as_str).unwrap_or("unknown error").to_string();
            Ok(Err(Failure::new(code, msg)))
        }
        None => Err("the engine sent a reply without \"ok\"".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::{Allowlist, ReplyKind};

    #[test]
    fn replies_round_trip() {
        let ok = Reply::Allow(Allowlist { vm: "a".into(), allow: vec!["203.0.113.7:51820".parse().unwrap()] });
        let line = encode(&Ok(ok.clone()));
        assert_eq!(line, r#"{"ok":true,"result":{"allow":["203.0.113.7:51820"],"vm":"a"}}"#);
        let back = decode(&line).unwrap().unwrap();
        assert_eq!(Reply::decode(ReplyKind::Allow, back).unwrap(), ok);
        let err = Err(Failure::new(ErrorCode::NotFound, "no VM named x"));
        assert_eq!(encode(&err), r#"{"code":"not_found","error":"no VM named x","ok":false}"#);
        assert_eq!(decode(&encode(&err)).unwrap(), Err(Failure::new(ErrorCode::NotFound, "no VM named x")));
        assert!(decode("not json").is_err());
        assert!(decode("{}").is_err());
    }
}

/// The JSON form itself: every key of a VM as the engine has always written it (clients
/// outside this crate read the types, so a rename here is caught here, not in the mesh).
#[cfg(test)]
mod form {
    use crate::reply::*;
    use crate::request::Request;

    fn vm() -> Vm {
        Vm {
            name: "a".into(),
            state: VmState::Booting,
            reason: None,
            mode: "filtered".into(),
            sample_rate: None,
            strategy: Some("full".into()),
            backend: Some("uring".into()),
            attachment: "file-handle".into(),
            handle: "fd:7".into(),
            mac: "52:54:00:00:00:02".into(),
            ip: "10.0.2.15/24".into(),
            gateway: "10.0.2.2".into(),
            gateway_mac: "52:54:00:00:00:01".into(),
            mtu: 1500,
            dhcp_lease: Some(3600),
            cpu: None,
            allow: vec!["203.0.113.7:51820".parse().unwrap()],
            starts: 1,
            port: None,
            guest: Some(Guest {
                pid: 42,
                kernel: "/k".into(),
                memory_mib: 1024,
                cpus: 1,
                cloud: Some(CloudGuest {
                    image: "/img".into(),
                    network: Addressing::Dhcp,
                    wireguard_public_key: "W".into(),
                    wireguard_port: 51820,
                    tunnel: "10.50.1.2/24".into(),
                    consumer_tunnel: "10.50.1.1".into(),
                    consumer_key: "C".into(),
                    ssh_user: "omerta".into(),
                    ssh_host_key: "ssh-ed25519 AAAA".into(),
                    ssh_host_fingerprint: "SHA256:x".into(),
                    proof_key: None,
                }),
                console: "/c".into(),
                boot: BootState::Booting,
                ready_after_s: None,
                boot_timeout_s: 300,
                paused: None,
                console_tail: None,
            }),
            rogue_checks: None,
            rogue_connections: None,
            rogue_blind: None,
        }
    }

    #[test]
    fn a_vm_is_written_with_the_keys_it_always_had() {
        let v = Reply::Vm(Box::new(vm())).to_json();
        assert_eq!(
            v.to_string(),
            concat!(
                r#"{"allow":["203.0.113.7:51820"],"attachment":"file-handle","backend":"uring","cpu":null,"#,
                r#""dhcp_lease":3600,"gateway":"10.0.2.2","gateway_mac":"52:54:00:00:00:01","guest":{"boot":"booting","#,
                r#""boot_timeout_s":300,"cloud":{"consumer_key":"C","consumer_tunnel":"10.50.1.1","image":"/img","#,
                r#""network":"dhcp","ssh_host_fingerprint":"SHA256:x","ssh_host_key":"ssh-ed25519 AAAA","#,
                r#""ssh_user":"omerta","tunnel":"10.50.1.2/24","wireguard_port":51820,"wireguard_public_key":"W"},"#,
                r#""console":"/c","console_tail":null,"cpus":1,"kernel":"/k","memory_mib":1024,"pid":42,"#,
                r#""ready_after_s":null},"handle":"fd:7","ip":"10.0.2.15/24","mac":"52:54:00:00:00:02","mode":"filtered","#,
                r#""mtu":1500,"name":"a","reason":null,"sample_rate":null,"starts":1,"state":"booting","strategy":"full"}"#
            )
        );
        let back = Reply::decode(ReplyKind::of(&Request::VmShow("a".into())), v).unwrap();
        assert_eq!(back, Reply::Vm(Box::new(vm())));
        // Direct mode adds its detector's figures; others never carry them.
        let direct = Vm { rogue_checks: Some(3), rogue_connections: Some(vec![]), rogue_blind: Some(vec![]), ..vm() };
        let j = Reply::Vm(Box::new(direct)).to_json();
        assert_eq!((j["rogue_checks"].as_u64(), j["rogue_blind"].as_array().map(Vec::len)), (Some(3), Some(0)));
    }

    #[test]
    fn states_and_counters_keep_their_names() {
        let names: Vec<String> = [
            VmState::Starting,
            VmState::Running,
            VmState::Booting,
            VmState::Ready,
            VmState::Stopped,
            VmState::Exited,
            VmState::Terminated,
            VmState::Failed,
            VmState::Removed,
            VmState::Kept,
        ]
        .iter()
        .map(|s| {
            assert_eq!(serde_json::to_value(s).unwrap(), serde_json::json!(s.name()));
            s.name().to_string()
        })
        .collect();
        assert_eq!(names.join(" "), "starting running booting ready stopped exited terminated failed removed kept");
        let stats = VmStats {
            vm: "a".into(),
            counters: [("frames_from_vm".to_string(), 8)].into(),
            dropped: 3,
            drops: [("not_allowlisted".to_string(), 3)].into(),
            terminated: None,
        };
        let j = Reply::Stats(vec![stats.clone()]).to_json();
        assert_eq!(
            j.to_string(),
            r#"[{"dropped":3,"drops":{"not_allowlisted":3},"frames_from_vm":8,"terminated":null,"vm":"a"}]"#
        );
        assert_eq!(Reply::decode(ReplyKind::Stats, j).unwrap(), Reply::Stats(vec![stats]));
    }
}
