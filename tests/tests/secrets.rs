//! No private key in any message: every output stream of every command
//! (`run`, `check`, `check --config`, and their error paths) is searched for
//! planted private keys and for the lab's own, in base64 and in the hex form
//! the UAPI uses.

use std::process::{Command, Output};

use wgtrace_tests::{LabGuard, TempDir, Traffic, lab, privileged_or_skip, wgtrace_bin};

/// A private key planted in configs and in a hostile UAPI reply.
const PLANTED: &str = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3I=";

fn hex_of(base64: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = String::new();
    for c in base64.bytes().take_while(|&c| c != b'=') {
        bits = bits << 6 | ALPHABET.iter().position(|&a| a == c).unwrap() as u32;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push_str(&format!("{:02x}", (bits >> count) & 0xff));
        }
    }
    out
}

/// Every private key of the lab's tunnels (from its wg-quick configs).
fn lab_private_keys() -> Vec<String> {
    let mut keys = Vec::new();
    for namespace in lab::NAMESPACES {
        let Ok(entries) = std::fs::read_dir(std::path::Path::new(lab::STATE_DIR).join(namespace)) else { continue };
        for entry in entries.flatten() {
            if entry.path().extension().is_some_and(|e| e == "conf") {
                let text = std::fs::read_to_string(entry.path()).unwrap();
                keys.extend(text.lines().filter_map(|l| l.strip_prefix("PrivateKey = ")).map(str::to_owned));
            }
        }
    }
    keys
}

/// Runs wgtrace in the lab client's namespace; returns (exit code, all output).
fn wgtrace(args: &[&str]) -> (i32, String) {
    let output: Output = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab::CLIENT))
        .arg(wgtrace_bin())
        .args(args)
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.code().unwrap_or(-1), text)
}

fn assert_secret_free(what: &str, text: &str, keys: &[String]) {
    for key in keys {
        let stem = key.trim_end_matches('=');
        assert!(!text.contains(stem), "{what} printed the private key {key}:\n{text}");
        assert!(!text.contains(&hex_of(key)), "{what} printed the private key {key} in hex:\n{text}");
        // Even a third of a key is too much.
        assert!(
            !text.contains(&stem[..16]) && !text.contains(&hex_of(key)[..22]),
            "{what} printed part of {key}:\n{text}"
        );
    }
}

/// Holds TUN device argv[1] and answers its UAPI socket with a reply that
/// carries the planted key (hex) and then fails to parse.
const LEAKY_DAEMON: &str = r#"
import fcntl, os, socket, struct, sys
name, key = sys.argv[1], sys.argv[2]
tun = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(tun, 0x400454ca, struct.pack("16sH", name.encode(), 0x0001 | 0x1000))
os.makedirs("/run/wireguard", exist_ok=True)
path = "/run/wireguard/%s.sock" % name
try:
    os.unlink(path)
except FileNotFoundError:
    pass
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
server.listen(8)
print("ready", flush=True)
replies = [b"private_key=%s\nlisten_port=%s\n\n", b"private_key=%s\npublic_key=%s\n\n", b"private_key=%s\nbogus %s\n\n"]
i = 0
while True:
    c, _ = server.accept()
    c.recv(100)
    c.sendall(replies[i % 3] % (key.encode(), key.encode()))
    i += 1
    c.close()
"#;

#[test]
fn no_command_prints_a_private_key_on_any_path() {
    if !privileged_or_skip("no_command_prints_a_private_key_on_any_path") {
        return;
    }
    let _lab = LabGuard::up(&lab::LabOptions { delay_ms: 0, ..Default::default() }).unwrap();
    let mut keys = lab_private_keys();
    assert!(keys.len() >= 4, "the lab's configs hold private keys: {keys:?}");
    keys.push(PLANTED.to_owned());
    let dir = TempDir::new("wgtrace-secrets").unwrap();
    let planted_hex = hex_of(PLANTED);
    assert_eq!(planted_hex.len(), 64);

    // A daemon (in the client namespace) whose replies hold the key and fail to parse.
    let mut daemon = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab::CLIENT))
        .args(["python3", "-c", LEAKY_DAEMON, "wgleak0", &planted_hex])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = [0u8; 6];
    std::io::Read::read_exact(daemon.stdout.as_mut().unwrap(), &mut ready).unwrap();

    let valid = format!(
        "[Interface]\nPrivateKey = {PLANTED}\nListenPort = 51829\n\n[Peer]\nPublicKey = \
         uFmW/sycfx/G0lcqdu2hHVm80gvo5UOxXOS9hajnWjM=\nEndpoint = {}:51829\nAllowedIPs = 198.18.9.0/24\n",
        lab::ROUTER_PUBLIC_V4
    );
    let configs = [
        ("before-interface", format!("PrivateKey = {PLANTED}\n{valid}")),
        ("colon", valid.replace("PrivateKey = ", "PrivateKey: ")),
        ("no-equals", valid.replace(&format!("PrivateKey = {PLANTED}"), &format!("PrivateKey {}", &PLANTED[..43]))),
        ("as-port", valid.replace("51829\n\n", &format!("{PLANTED}\n\n"))),
        ("as-section", format!("[{PLANTED}]\n{valid}")),
        ("as-endpoint", valid.replace(&format!("{}:51829", lab::ROUTER_PUBLIC_V4), PLANTED)),
        ("as-allowed", valid.replace("198.18.9.0/24", PLANTED)),
        ("valid", valid.clone()),
    ];
    let _traffic = Traffic::ping(lab::WG1_REMOTE).unwrap();
    for (name, text) in &configs {
        let path = dir.0.join(format!("wg-{name}.conf"));
        std::fs::write(&path, text).unwrap();
        for json in [false, true] {
            let mut args = vec!["check", "--config", path.to_str().unwrap()];
            if json {
                args.push("--json");
            }
            let (code, output) = wgtrace(&args);
            assert_secret_free(&format!("check --config ({name})"), &output, &keys);
            assert!(code == 1 || code == 2, "check --config {name}: exit {code}: {output}");
            if *name == "colon" {
                assert_eq!(code, 1, "a misspelt key is a finding: {output}");
                assert!(output.contains("line 2") && output.contains("privatekey"), "{output}");
            }
        }
    }
    for args in [
        &["check"][..],
        &["check", "--json"],
        &["check", "--all-netns", "--json"],
        &["check", "--netns", "wgtrace-no-such-namespace"],
        &["check", "--config", "/nonexistent/wg7.conf"],
        &["run", "--netns", "wgtrace-no-such-namespace", "--duration", "1"],
        &["run", "--duration", "3", "--json", "-vv"],
        &["run", "--duration", "2", "-vv", "--drop-privileges"],
    ] {
        let (code, output) = wgtrace(args);
        assert_secret_free(&args.join(" "), &output, &keys);
        assert!(code != 101, "{args:?} panicked: {output}");
        if args.contains(&"wgtrace-no-such-namespace") || args.contains(&"/nonexistent/wg7.conf") {
            assert_eq!(code, 2, "{args:?}: could not check/run: {output}");
        }
        if args.contains(&"-vv") {
            assert!(output.contains("wgleak0"), "the leaky daemon was asked: {output}");
        }
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = std::fs::remove_file("/run/wireguard/wgleak0.sock");
}
