//! Issuing v2 tokens three ways that must agree byte for byte: the library
//! (`psync::auth`), the `psync-token` binary, and the Python example
//! `contrib/token/psync_token.py` (standard library only), which is what a
//! backend copies. The shared test vectors in `contrib/token/vectors.txt`
//! pin all three to the specification in PROTOCOL.md.
//!
//! Python 3 is on every machine CI runs on; if it is missing, these tests
//! fail rather than skip.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use psync::auth::{decode_token, encode_token, issue_token, Key, KeySet, TokenError};
use psync::wire::v2::Pair;

const TOKEN_BIN: &str = env!("CARGO_BIN_EXE_psync-token");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn python_script() -> PathBuf {
    Path::new(ROOT).join("contrib/token/psync_token.py")
}

fn vectors_file() -> PathBuf {
    Path::new(ROOT).join("contrib/token/vectors.txt")
}

/// A file in the temp directory, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(contents: &str) -> TempFile {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "psync-auth-test-{}-{}.keys",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).unwrap();
        set_mode(&path, 0o600);
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn run(program: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .env_remove("PSYNC_TOKEN_KEY_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (python3 must be installed)"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn python(args: &[&str], stdin: &str) -> Output {
    let script = python_script();
    let mut all = vec![script.to_str().unwrap()];
    all.extend_from_slice(args);
    run("python3", &all, stdin)
}

fn token_bin(args: &[&str]) -> Output {
    run(TOKEN_BIN, args, "")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn parse_id(s: &str) -> u64 {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).unwrap(),
        None => s.parse().unwrap(),
    }
}

/// Three keys of the lengths the format allows (16, 32 and 64 bytes), the
/// one listed last (key 7) being the default.
const KEY_FILE: &str = "\
# test keys
3 000102030405060708090a0b0c0d0e0f
4000000000 0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0  # old
7 a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5
";

#[test]
fn the_library_matches_the_vectors() {
    let text = std::fs::read_to_string(vectors_file()).unwrap();
    let protocol = std::fs::read_to_string(Path::new(ROOT).join("PROTOCOL.md")).unwrap();
    let mut count = 0;
    for line in text.lines() {
        let line = line.split('#').next().unwrap();
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.is_empty() {
            continue;
        }
        let [key_id, secret, expiry, self_id, peer_id, mac, token] = w[..] else {
            panic!("bad vector line: {line}");
        };
        let key = Key::new(key_id.parse().unwrap(), &hex(secret)).unwrap();
        let pair = Pair::new(parse_id(self_id), parse_id(peer_id));
        let issued = issue_token(&key, pair, expiry.parse().unwrap());
        assert_eq!(issued.mac[..], hex(mac)[..], "{line}");
        assert_eq!(encode_token(&issued), token, "{line}");
        assert_eq!(decode_token(token), Ok(issued));
        assert!(
            protocol.contains(&format!("`{mac}`")),
            "PROTOCOL.md lacks {mac}"
        );
        assert!(
            protocol.contains(&format!("`{token}`")),
            "PROTOCOL.md lacks {token}"
        );
        count += 1;
    }
    assert_eq!(count, 5);
}

#[test]
fn python_passes_its_self_test_on_the_vectors() {
    let out = python(&["--self-test", vectors_file().to_str().unwrap()], "");
    assert_eq!(stdout(&out).trim(), "5 vectors ok");
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

#[test]
fn python_and_rust_issue_identical_tokens() {
    let file = TempFile::new(KEY_FILE);
    let keys = KeySet::parse(KEY_FILE).unwrap();
    let ids: Vec<u32> = keys.ids().collect();
    let mut state = 0x9e37_79b9_7f4a_7c15;
    let edges = [0, 1, u64::from(u32::MAX), u64::MAX - 1, u64::MAX];
    let mut cases = Vec::new();
    for i in 0..600 {
        let pick = |state: &mut u64| {
            let r = next(state);
            if r % 4 == 0 {
                edges[(r >> 8) as usize % edges.len()]
            } else {
                next(state)
            }
        };
        let key_id = ids[i % ids.len()];
        let expiry = pick(&mut state);
        let self_id = pick(&mut state);
        let mut peer_id = pick(&mut state);
        if peer_id == self_id {
            peer_id = self_id.wrapping_add(1);
        }
        cases.push((key_id, expiry, Pair::new(self_id, peer_id)));
    }
    let input: String = cases
        .iter()
        .map(|(k, e, p)| format!("{k} {e} {} {}\n", p.self_id, p.peer_id))
        .collect();
    let out = python(&["--key-file", file.path(), "--batch"], &input);
    let lines: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), cases.len());
    for ((key_id, expiry, pair), line) in cases.iter().zip(&lines) {
        let want = encode_token(&issue_token(keys.get(*key_id).unwrap(), *pair, *expiry));
        assert_eq!(*line, want, "key {key_id} expiry {expiry} {pair:?}");
    }
}

#[test]
fn python_and_psync_token_agree_on_the_command_line() {
    let file = TempFile::new(KEY_FILE);
    for args in [
        // The default key is the one listed last (7).
        &["--self", "1", "--peer", "2", "--expiry", "1700000000"][..],
        &[
            "--self",
            "0xdeadbeefcafef00d",
            "--peer",
            "42",
            "--expiry",
            "99",
            "--both",
        ],
        &[
            "--self",
            "5",
            "--peer",
            "6",
            "--expiry",
            "1",
            "--key-id",
            "4000000000",
        ],
        &[
            "--self",
            "18446744073709551615",
            "--peer",
            "0",
            "--expiry",
            "18446744073709551615",
            "--key-id",
            "3",
        ],
    ] {
        let mut full = vec!["--key-file", file.path()];
        full.extend_from_slice(args);
        let rust = stdout(&token_bin(&full));
        let py = stdout(&python(&full, ""));
        assert_eq!(rust, py, "{args:?}");
        assert_eq!(
            rust.lines().count(),
            if args.contains(&"--both") { 2 } else { 1 }
        );
    }
    // And the library agrees with both.
    let keys = KeySet::parse(KEY_FILE).unwrap();
    let want = encode_token(&keys.get(7).unwrap().issue(Pair::new(1, 2), 1_700_000_000));
    let got = stdout(&token_bin(&[
        "--key-file",
        file.path(),
        "--self",
        "1",
        "--peer",
        "2",
        "--expiry",
        "1700000000",
    ]));
    assert_eq!(got.trim(), want);
}

/// Both implementations refuse the same bad key files, naming the same line.
#[test]
fn python_and_rust_refuse_the_same_key_files() {
    let k16 = "000102030405060708090a0b0c0d0e0f";
    let bad = [
        String::new(),
        format!("1 {k16}\n\n1\n"),
        format!("1 {k16} 2\n"),
        format!("x1 {k16}\n"),
        format!("+1 {k16}\n"),
        format!("4294967296 {k16}\n"),
        format!("1 {k16}f\n"),
        format!("1 {k16}zz\n"),
        "1 00112233445566778899aabbccddee\n".to_string(),
        format!("1 {}\n", "00".repeat(65)),
        format!("9 {k16}\n# x\n9 {k16}\n"),
    ];
    for text in &bad {
        let rust_err = KeySet::parse(text).expect_err(text).to_string();
        let file = TempFile::new(text);
        let args = ["--key-file", file.path(), "--self", "1", "--peer", "2"];
        for (who, out) in [
            ("python", python(&args, "")),
            ("psync-token", token_bin(&args)),
        ] {
            assert_eq!(out.status.code(), Some(2), "{who} on {text:?}");
            let err = stderr(&out);
            assert_eq!(err.lines().count(), 1, "{who}: one line: {err}");
            // Same line number, same first words as the library's message.
            let lead: String = rust_err.split(':').next().unwrap().to_string();
            assert!(
                err.contains(&lead),
                "{who} on {text:?}: {err} (want {rust_err})"
            );
        }
    }
}

#[test]
fn psync_token_issues_tokens_the_key_set_accepts() {
    let file = TempFile::new(KEY_FILE);
    let keys = KeySet::parse(KEY_FILE).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let out = stdout(&token_bin(&[
        "--key-file",
        file.path(),
        "--self",
        "0x10",
        "--peer",
        "0x20",
        "--lifetime",
        "2h",
        "--both",
    ]));
    let lines: Vec<&str> = out.lines().collect();
    let (a, b) = (
        decode_token(lines[0]).unwrap(),
        decode_token(lines[1]).unwrap(),
    );
    assert_eq!(a.pair, Pair::new(16, 32));
    assert_eq!(b.pair, a.pair.counterpart());
    assert_eq!(a.key_id, 7);
    assert_eq!(keys.verify(&a, now), Ok(7));
    assert_eq!(keys.verify(&b, now), Ok(7));
    // Two hours from when it ran: well past now + 1 h, well before now + 3 h.
    assert!(a.expiry > now + 3600 && a.expiry < now + 3 * 3600);
    // The environment variable stands for --key-file.
    let out = Command::new(TOKEN_BIN)
        .args(["--self", "1", "--peer", "2", "--key-id", "3"])
        .env("PSYNC_TOKEN_KEY_FILE", file.path())
        .output()
        .unwrap();
    let t = decode_token(&stdout(&out)).unwrap();
    assert_eq!((t.key_id, keys.verify(&t, now)), (3, Ok(3)));
}

#[test]
fn psync_token_check_reports_why() {
    let file = TempFile::new(KEY_FILE);
    let issue = |args: &[&str]| {
        let mut full = vec!["--key-file", file.path()];
        full.extend_from_slice(args);
        stdout(&token_bin(&full)).trim().to_owned()
    };
    let check = |token: &str, keys: &str| {
        let out = token_bin(&["--key-file", keys, "--check", token]);
        (out.status.code(), String::from_utf8(out.stdout).unwrap())
    };
    let good = issue(&["--self", "1", "--peer", "2"]);
    let (code, text) = check(&good, file.path());
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("valid:   yes") && text.contains("self:    1"),
        "{text}"
    );

    let old = issue(&["--self", "1", "--peer", "2", "--expiry", "1000"]);
    let (code, text) = check(&old, file.path());
    assert_eq!(code, Some(1));
    assert!(text.contains(&TokenError::Expired.to_string()), "{text}");

    // Key 7 retired: the same token names an unknown key.
    let rotated = TempFile::new("3 000102030405060708090a0b0c0d0e0f\n");
    let (code, text) = check(&good, rotated.path());
    assert_eq!(code, Some(1));
    assert!(text.contains(&TokenError::UnknownKey.to_string()), "{text}");

    // Key 7 with another secret: a bad MAC.
    let other = TempFile::new("7 ffffffffffffffffffffffffffffffff\n");
    let (code, text) = check(&good, other.path());
    assert_eq!(code, Some(1));
    assert!(text.contains(&TokenError::BadMac.to_string()), "{text}");

    let out = token_bin(&["--key-file", file.path(), "--check", "garbage!"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).starts_with("psync-token: error: --check: token is not base64url"));
}

#[test]
fn psync_token_errors_are_one_line() {
    let file = TempFile::new(KEY_FILE);
    let f = file.path();
    for (args, want) in [
        (&["--self", "1", "--peer", "2"][..], "--key-file"),
        (
            &[
                "--key-file",
                "/nonexistent/psync.keys",
                "--self",
                "1",
                "--peer",
                "2",
            ],
            "cannot read key file /nonexistent/psync.keys",
        ),
        (
            &["--key-file", f, "--self", "1", "--peer", "1"],
            "--self and --peer are both 1",
        ),
        (
            &[
                "--key-file",
                f,
                "--self",
                "1",
                "--peer",
                "2",
                "--key-id",
                "8",
            ],
            "--key-id 8: the key file has keys 3, 7, 4000000000",
        ),
        (
            &[
                "--key-file",
                f,
                "--self",
                "1",
                "--peer",
                "2",
                "--lifetime",
                "0",
            ],
            "must be 1s to 366d",
        ),
        (
            &[
                "--key-file",
                f,
                "--self",
                "1",
                "--peer",
                "2",
                "--lifetime",
                "367d",
            ],
            "must be 1s to 366d",
        ),
        (
            &[
                "--key-file",
                f,
                "--self",
                "1",
                "--peer",
                "2",
                "--lifetime",
                "ten",
            ],
            "is not a duration",
        ),
        (
            &["--key-file", f, "--self", "-1", "--peer", "2"],
            "not a 64-bit ID",
        ),
        (
            &[
                "--key-file",
                f,
                "--self",
                "0x1ffffffffffffffff",
                "--peer",
                "2",
            ],
            "not a 64-bit ID",
        ),
        (&["--key-file", f, "--self", "1"], "--peer"),
        (
            &[
                "--key-file",
                f,
                "--self",
                "1",
                "--peer",
                "2",
                "--expiry",
                "5",
                "--lifetime",
                "1m",
            ],
            "cannot be used with",
        ),
    ] {
        let out = token_bin(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("psync-token: error: "), "{err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn psync_token_warns_about_a_key_file_others_can_read() {
    let file = TempFile::new(KEY_FILE);
    set_mode(&file.0, 0o644);
    let out = token_bin(&["--key-file", file.path(), "--self", "1", "--peer", "2"]);
    assert!(out.status.success());
    assert!(
        stderr(&out).contains("can be read by other users"),
        "{}",
        stderr(&out)
    );
    set_mode(&file.0, 0o600);
    let out = token_bin(&["--key-file", file.path(), "--self", "1", "--peer", "2"]);
    assert_eq!(stderr(&out), "");
}

#[test]
fn psync_token_makes_new_keys() {
    let a = stdout(&token_bin(&["--new-key", "12"]));
    let b = stdout(&token_bin(&["--new-key", "12"]));
    assert_ne!(a, b, "each key is random");
    let set = KeySet::parse(&a).unwrap();
    assert_eq!(set.ids().collect::<Vec<_>>(), [12]);
    assert_eq!(a.trim().len(), "12 ".len() + 64, "32 bytes of hex");
}
