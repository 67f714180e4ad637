#!/usr/bin/env python3
"""Issue psync v2 tokens from an application backend, with Python's standard
library only.

A token lets one peer register one direction of one pair with a psync server
until it expires. The backend, which knows both users, gives each peer the
token for its own direction: (a, b) to peer a, (b, a) to peer b. The peer
passes it to `psync-client --token`.

    mac   = HMAC-SHA256(key, key_id ‖ expiry ‖ self_id ‖ peer_id)[:16]
            (u32, u64, u64, u64, big-endian)
    token = base64url, unpadded, of self_id ‖ peer_id ‖ key_id ‖ expiry ‖ mac
            (44 bytes, 59 characters)

Use it as a module (copy this file into your backend):

    from psync_token import read_key_file, issue_token
    keys, newest = read_key_file(open("/etc/psync/auth.keys").read())
    token = issue_token(keys[newest], newest, int(time.time()) + 600, a, b)

or from the shell, as psync-token does:

    psync_token.py --key-file auth.keys --self 1 --peer 2 --lifetime 10m

The key file is the server's: one `KEY_ID SECRET_HEX` per line, `#` starts a
comment, the key listed last is the default. PROTOCOL.md (v2, tokens) is the
specification; CI checks this file against the Rust implementation
(tests/auth_python.rs) and against contrib/token/vectors.txt.
"""

import argparse
import base64
import hashlib
import hmac
import os
import re
import struct
import sys
import time

MAC_LEN = 16
MIN_KEY_LEN = 16
MAX_KEY_LEN = 64
MAX_KEYS = 256
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
MAX_LIFETIME = 366 * 86400


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the line."""


def read_key_file(text):
    """Parses a key file. Returns ({key_id: secret_bytes}, id_of_last_key)."""
    keys = {}
    first_line = {}
    last = None
    for number, raw in enumerate(text.splitlines(), start=1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2:
            raise KeyFileError(
                f"line {number}: expected 'KEY_ID SECRET_HEX', found {len(words)} fields"
            )
        id_text, secret_hex = words
        if not re.fullmatch(r"[0-9]+", id_text) or int(id_text) > U32_MAX:
            raise KeyFileError(
                f"line {number}: key ID '{id_text[:20]}' is not a whole number "
                "from 0 to 4294967295"
            )
        key_id = int(id_text)
        if not re.fullmatch(r"(?:[0-9a-fA-F]{2})*", secret_hex):
            raise KeyFileError(f"line {number}: the secret of key {key_id} is not hex")
        secret = bytes.fromhex(secret_hex)
        if not MIN_KEY_LEN <= len(secret) <= MAX_KEY_LEN:
            raise KeyFileError(
                f"line {number}: the secret of key {key_id} is {len(secret)} bytes; "
                f"it must be {MIN_KEY_LEN} to {MAX_KEY_LEN} bytes"
            )
        if key_id in keys:
            raise KeyFileError(
                f"line {number}: key ID {key_id} is already used on line {first_line[key_id]}"
            )
        if len(keys) == MAX_KEYS:
            raise KeyFileError(f"line {number}: more than {MAX_KEYS} keys")
        keys[key_id] = secret
        first_line[key_id] = number
        last = key_id
    if last is None:
        raise KeyFileError("no keys: the file has no 'KEY_ID SECRET_HEX' line")
    return keys, last


def token_mac(secret, key_id, expiry, self_id, peer_id):
    """The 16-byte MAC of a token."""
    message = struct.pack(">IQQQ", key_id, expiry, self_id, peer_id)
    return hmac.new(secret, message, hashlib.sha256).digest()[:MAC_LEN]


def issue_token(secret, key_id, expiry, self_id, peer_id):
    """The text form of the token for (self_id, peer_id), valid until
    `expiry` (Unix seconds), made with key `key_id` whose secret is `secret`."""
    if self_id == peer_id:
        raise ValueError("self_id and peer_id must differ")
    for name, value, top in (
        ("key_id", key_id, U32_MAX),
        ("expiry", expiry, U64_MAX),
        ("self_id", self_id, U64_MAX),
        ("peer_id", peer_id, U64_MAX),
    ):
        if not 0 <= value <= top:
            raise ValueError(f"{name} {value} is outside 0 to {top}")
    mac = token_mac(secret, key_id, expiry, self_id, peer_id)
    raw = struct.pack(">QQIQ", self_id, peer_id, key_id, expiry) + mac
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def parse_id(text):
    """A 64-bit ID: decimal, or hex with 0x."""
    try:
        value = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number (decimal or 0x hex)")
    if not 0 <= value <= U64_MAX:
        raise argparse.ArgumentTypeError(f"{text} is outside 0 to 2^64-1")
    return value


def parse_duration(text):
    """Seconds from `600`, `30s`, `10m`, `2h` or `1d`: 1 s to 366 days."""
    match = re.fullmatch(r"([0-9]+)([smhd]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"'{text}' is not a duration like 30s, 10m, 2h or 1d")
    seconds = int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    if not 1 <= seconds <= MAX_LIFETIME:
        raise argparse.ArgumentTypeError(f"{text} is outside 1s to 366d")
    return seconds


def parse_expiry(text):
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a Unix time in seconds")
    if not 0 <= value <= U64_MAX:
        raise argparse.ArgumentTypeError(f"{text} is outside 0 to 2^64-1")
    return value


def self_test(path):
    """Checks every vector in a vectors file; returns how many."""
    count = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            key_id, secret_hex, expiry, self_id, peer_id, mac_hex, token = words
            secret = bytes.fromhex(secret_hex)
            args = (int(key_id), int(expiry), parse_id(self_id), parse_id(peer_id))
            mac = token_mac(secret, *args).hex()
            got = issue_token(secret, *args)
            if mac != mac_hex or got != token:
                raise SystemExit(f"{path}:{number}: got mac {mac} token {got}")
            count += 1
    return count


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="psync_token.py",
        description="Print a psync v2 token (what psync-client --token takes).",
    )
    parser.add_argument("--key-file", metavar="PATH", default=os.environ.get("PSYNC_TOKEN_KEY_FILE"),
                        help="the key file (env PSYNC_TOKEN_KEY_FILE)")
    parser.add_argument("--key-id", type=int, metavar="N",
                        help="key to issue with (default: the key listed last)")
    parser.add_argument("--self", dest="self_id", type=parse_id, metavar="ID",
                        help="the ID of the peer that will use the token")
    parser.add_argument("--peer", dest="peer_id", type=parse_id, metavar="ID",
                        help="the ID of the peer it may meet")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--lifetime", type=parse_duration, default=600, metavar="DURATION",
                      help="how long the token is valid from now (default 10m)")
    when.add_argument("--expiry", type=parse_expiry, metavar="UNIX_SECS",
                      help="absolute expiry instead of --lifetime")
    parser.add_argument("--both", action="store_true",
                        help="also print the token for the other direction, on a second line")
    parser.add_argument("--batch", action="store_true",
                        help="read 'KEY_ID EXPIRY SELF PEER' lines from stdin, print one token each")
    parser.add_argument("--self-test", metavar="VECTORS",
                        help="check a test-vector file (contrib/token/vectors.txt) and exit")
    args = parser.parse_args(argv)
    prog = parser.prog

    if args.self_test:
        print(f"{self_test(args.self_test)} vectors ok")
        return 0
    if not args.key_file:
        parser.error("--key-file (or PSYNC_TOKEN_KEY_FILE) is required")
    try:
        with open(args.key_file, encoding="utf-8") as f:
            keys, last = read_key_file(f.read())
    except OSError as e:
        print(f"{prog}: error: cannot read key file {args.key_file}: {e.strerror}", file=sys.stderr)
        return 2
    except (KeyFileError, UnicodeDecodeError) as e:
        print(f"{prog}: error: key file {args.key_file}: {e}", file=sys.stderr)
        return 2

    if args.batch:
        for line in sys.stdin:
            if not line.strip():
                continue
            key_id, expiry, self_id, peer_id = (int(w, 0) for w in line.split())
            print(issue_token(keys[key_id], key_id, expiry, self_id, peer_id))
        return 0

    if args.self_id is None or args.peer_id is None:
        parser.error("--self and --peer are required")
    if args.self_id == args.peer_id:
        parser.error("--self and --peer must differ")
    key_id = last if args.key_id is None else args.key_id
    if key_id not in keys:
        print(f"{prog}: error: key file {args.key_file} has no key {key_id}", file=sys.stderr)
        return 2
    expiry = args.expiry if args.expiry is not None else int(time.time()) + args.lifetime
    print(issue_token(keys[key_id], key_id, expiry, args.self_id, args.peer_id))
    if args.both:
        print(issue_token(keys[key_id], key_id, expiry, args.peer_id, args.self_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
