"""Registry keys: Ed25519 (RFC 8032), the OpenSSH key files Ollama keeps in ~/.ollama, and its auth header."""
import base64
import hashlib
import os
import shutil
import stat
import subprocess

import pytest

import ollama
from ollama import Ed25519Key, OllamaError

# RFC 8032 section 7.1: (secret key, public key, message, signature), all hex.
RFC8032_VECTORS = [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
     "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
     "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
     "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
     "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
    # TEST SHA(abc): the message is SHA-512("abc"), 64 bytes
    ("833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
     "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
     "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
     "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
     "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b589"
     "09351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704"),
]
ED25519_L = 2 ** 252 + 27742317777372353535851937790883648493

needs_ssh_keygen = pytest.mark.skipif(not shutil.which("ssh-keygen"), reason="ssh-keygen not installed")


def _string(data):
    return len(data).to_bytes(4, "big") + data


def _read_string(buf, pos):
    n = int.from_bytes(buf[pos:pos + 4], "big")
    return buf[pos + 4:pos + 4 + n], pos + 4 + n


def _pem_body(pem, label):
    lines = pem.decode("ascii").splitlines()
    assert lines[0] == "-----BEGIN %s-----" % label and lines[-1] == "-----END %s-----" % label
    return base64.b64decode("".join(lines[1:-1]))


# -- Ed25519 -------------------------------------------------------------------

@pytest.mark.parametrize("secret,public,message,signature", RFC8032_VECTORS)
def test_rfc8032_vectors_derive_public_key_and_signature(secret, public, message, signature):
    key = Ed25519Key.from_seed(bytes.fromhex(secret))
    assert key.public.hex() == public
    assert key.sign(bytes.fromhex(message)).hex() == signature
    assert Ed25519Key.verify(bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature))


def test_generated_keys_differ_and_sign_verifiably():
    a, b = Ed25519Key.generate(), Ed25519Key.generate()
    assert a.seed != b.seed and a.public != b.public
    assert len(a.seed) == len(a.public) == 32
    sig = a.sign(b"hello")
    assert len(sig) == 64
    assert Ed25519Key.verify(a.public, b"hello", sig)
    assert not Ed25519Key.verify(b.public, b"hello", sig)


def test_verify_rejects_tampered_message_and_signature():
    key = Ed25519Key.generate()
    msg = b"GET,https://registry.example/token?nonce=x,abc"
    sig = key.sign(msg)
    assert not Ed25519Key.verify(key.public, msg + b"!", sig)
    for i in (0, 31, 32, 63):                       # R and S halves, both ends
        bad = bytearray(sig)
        bad[i] ^= 1
        assert not Ed25519Key.verify(key.public, msg, bytes(bad))


def test_verify_rejects_malformed_inputs():
    key = Ed25519Key.generate()
    sig = key.sign(b"m")
    assert not Ed25519Key.verify(key.public, b"m", sig[:63])
    assert not Ed25519Key.verify(key.public[:31], b"m", sig)
    # S >= L is not canonical (RFC 8032 5.1.7 step 1), even though S - L would verify
    s = int.from_bytes(sig[32:], "little") + ED25519_L
    assert not Ed25519Key.verify(key.public, b"m", sig[:32] + s.to_bytes(32, "little"))
    # y = 2 is on no point of the curve
    off_curve = (2).to_bytes(32, "little")
    assert not Ed25519Key.verify(off_curve, b"m", sig)
    assert not Ed25519Key.verify(key.public, b"m", off_curve + sig[32:])


def test_from_seed_rejects_wrong_length():
    with pytest.raises(ValueError):
        Ed25519Key.from_seed(b"\x00" * 31)


# -- OpenSSH key files ---------------------------------------------------------

def test_public_key_line_is_ssh_wire_format():
    key = Ed25519Key.from_seed(bytes.fromhex(RFC8032_VECTORS[0][0]))
    b64 = key.authorized_key_b64()
    assert key.public_key_line() == "ssh-ed25519 " + b64
    assert base64.b64decode(b64) == _string(b"ssh-ed25519") + _string(key.public)
    assert b64.startswith("AAAAC3NzaC1lZDI1NTE5AAAAI")


def test_openssh_private_is_go_marshal_private_key_layout():
    key = Ed25519Key.from_seed(bytes.fromhex(RFC8032_VECTORS[1][0]))
    pem = key.to_openssh_private()
    assert pem.endswith(b"\n-----END OPENSSH PRIVATE KEY-----\n")
    lines = pem.decode().splitlines()[1:-1]
    assert all(len(line) == 64 for line in lines[:-1]) and 0 < len(lines[-1]) <= 64   # encoding/pem width
    body = _pem_body(pem, "OPENSSH PRIVATE KEY")
    assert body.startswith(b"openssh-key-v1\x00")
    pos = len(b"openssh-key-v1\x00")
    cipher, pos = _read_string(body, pos)
    kdf, pos = _read_string(body, pos)
    kdfopts, pos = _read_string(body, pos)
    assert (cipher, kdf, kdfopts) == (b"none", b"none", b"")
    assert body[pos:pos + 4] == b"\x00\x00\x00\x01"
    pubblob, pos = _read_string(body, pos + 4)
    assert pubblob == _string(b"ssh-ed25519") + _string(key.public)
    block, pos = _read_string(body, pos)
    assert pos == len(body)
    assert block[:4] == block[4:8]                              # checkint twice
    unpadded = (block[:8] + _string(b"ssh-ed25519") + _string(key.public)
                + _string(key.seed + key.public) + _string(b""))
    pad = (-len(unpadded)) % 8
    assert block == unpadded + bytes(range(1, pad + 1))
    assert len(block) % 8 == 0


def test_openssh_private_round_trip_keeps_key():
    key = Ed25519Key.generate()
    again = Ed25519Key.from_openssh_private(key.to_openssh_private())
    assert (again.seed, again.public) == (key.seed, key.public)
    assert Ed25519Key.from_openssh_private(key.to_openssh_private().decode()).public == key.public


def _corrupt_block(pem, edit):
    """Re-armor `pem` after `edit(private_block) -> private_block` (the block is the last string)."""
    body = _pem_body(pem, "OPENSSH PRIVATE KEY")
    pos = len(b"openssh-key-v1\x00")
    for _ in range(3):
        _, pos = _read_string(body, pos)
    _, pos = _read_string(body, pos + 4)
    block, _ = _read_string(body, pos)
    b64 = base64.b64encode(body[:pos] + _string(edit(block))).decode()
    return ("-----BEGIN OPENSSH PRIVATE KEY-----\n%s\n-----END OPENSSH PRIVATE KEY-----\n" % b64).encode()


@pytest.mark.parametrize("edit,error", [
    (lambda b: b[:4] + bytes([b[4] ^ 1]) + b[5:], "ssh: checkint mismatch"),
    (lambda b: b[:-1] + b"\x09" if b[-1] else b + b"\x09", "ssh: padding not as expected"),
    (lambda b: b[:60], "ssh: invalid openssh private key format"),
    (lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:], "ssh: ed25519 public key does not match its private key"),
])
def test_from_openssh_private_rejects_corrupt_keys(edit, error):
    pem = _corrupt_block(Ed25519Key.generate().to_openssh_private(), edit)
    with pytest.raises(OllamaError) as exc:
        Ed25519Key.from_openssh_private(pem)
    assert str(exc.value) == error


def test_from_openssh_private_rejects_non_keys():
    with pytest.raises(OllamaError, match="^ssh: no key found$"):
        Ed25519Key.from_openssh_private(b"ssh-ed25519 AAAA\n")
    with pytest.raises(OllamaError, match="^ssh: invalid openssh private key format$"):
        Ed25519Key.from_openssh_private(
            b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n")


@needs_ssh_keygen
def test_ssh_keygen_reads_our_private_key(tmp_path):
    key = Ed25519Key.generate()
    path = tmp_path / "id_ed25519"
    path.write_bytes(key.to_openssh_private())
    path.chmod(0o600)
    out = subprocess.run(["ssh-keygen", "-y", "-f", str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.split()[:2] == key.public_key_line().split()


@needs_ssh_keygen
def test_we_read_ssh_keygen_private_key(tmp_path):
    path = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "someone@host", "-f", str(path)],
                   check=True)
    key = Ed25519Key.from_openssh_private(path.read_bytes())
    assert (path.parent / "id_ed25519.pub").read_text().split()[:2] == key.public_key_line().split()


@needs_ssh_keygen
def test_passphrase_protected_key_is_refused(tmp_path):
    path = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(path)], check=True)
    with pytest.raises(OllamaError, match="^ssh: this private key is passphrase protected$"):
        Ed25519Key.from_openssh_private(path.read_bytes())


def _sshsig_signed_data(namespace, message):
    """What an SSHSIG signature signs (OpenSSH PROTOCOL.sshsig), with SHA-512."""
    return (b"SSHSIG" + _string(namespace) + _string(b"") + _string(b"sha512")
            + _string(hashlib.sha512(message).digest()))


@needs_ssh_keygen
def test_signatures_match_openssh_both_ways(tmp_path):
    """OpenSSH's ed25519 and ours make the same (deterministic) signature, and each verifies the other's."""
    path, msg = tmp_path / "id_ed25519", tmp_path / "msg"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    msg.write_bytes(b"GET,https://registry.ollama.ai/v2/token?ts=1,x")
    key = Ed25519Key.from_openssh_private(path.read_bytes())
    signed = _sshsig_signed_data(b"file", msg.read_bytes())

    # OpenSSH signs; we verify, and sign the same bytes identically
    subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", str(path), "-n", "file", str(msg)],
                   check=True, capture_output=True)
    body = _pem_body((tmp_path / "msg.sig").read_bytes(), "SSH SIGNATURE")
    pos = 6 + 4                                                   # "SSHSIG", version
    for _ in range(4):                                            # public key, namespace, reserved, hash
        _, pos = _read_string(body, pos)
    sigblob, _ = _read_string(body, pos)
    algo, p = _read_string(sigblob, 0)
    theirs, _ = _read_string(sigblob, p)
    assert algo == b"ssh-ed25519"
    assert Ed25519Key.verify(key.public, signed, theirs)
    assert key.sign(signed) == theirs

    # we sign a fresh key's SSHSIG; OpenSSH verifies it
    ours = Ed25519Key.generate()
    sig = (b"SSHSIG" + (1).to_bytes(4, "big") + _string(ours.public_blob()) + _string(b"file") + _string(b"")
           + _string(b"sha512") + _string(_string(b"ssh-ed25519")
                                          + _string(ours.sign(_sshsig_signed_data(b"file", msg.read_bytes())))))
    b64 = base64.b64encode(sig).decode()
    armored = "-----BEGIN SSH SIGNATURE-----\n%s\n-----END SSH SIGNATURE-----\n" % "\n".join(
        b64[i:i + 70] for i in range(0, len(b64), 70))
    (tmp_path / "ours.sig").write_text(armored)
    check = subprocess.run(["ssh-keygen", "-Y", "check-novalidate", "-n", "file", "-s", str(tmp_path / "ours.sig")],
                           stdin=msg.open("rb"), capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "Good" in check.stdout
    # and a tampered message fails there too
    bad = subprocess.run(["ssh-keygen", "-Y", "check-novalidate", "-n", "file", "-s", str(tmp_path / "ours.sig")],
                         input=b"tampered", capture_output=True)
    assert bad.returncode != 0


# -- ensure_keypair --------------------------------------------------------------

def test_ensure_keypair_creates_key_files_with_ollamas_message(ollama_home, capsys):
    home = ollama_home / ".ollama"
    key = ollama.ensure_keypair(home)
    priv, pub = home / "id_ed25519", home / "id_ed25519.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    line = key.public_key_line()
    assert pub.read_text() == line + "\n"
    assert Ed25519Key.from_openssh_private(priv.read_bytes()).seed == key.seed
    captured = capsys.readouterr()
    assert captured.err == ("Couldn't find '%s'. Generating new private key.\n"
                            "Your new public key is: \n\n%s\n\n" % (priv, line))
    assert captured.out == ""
    assert sorted(p.name for p in home.iterdir()) == ["id_ed25519", "id_ed25519.pub"]   # no temp files left


def test_ensure_keypair_loads_existing_key_silently(ollama_home, capsys):
    home = ollama_home / ".ollama"
    first = ollama.ensure_keypair(home)
    before = {p.name: p.read_bytes() for p in home.iterdir()}
    capsys.readouterr()
    second = ollama.ensure_keypair(home)
    assert second.seed == first.seed
    assert capsys.readouterr().err == ""
    assert {p.name: p.read_bytes() for p in home.iterdir()} == before


def test_ensure_keypair_restores_missing_public_key_file(ollama_home, capsys):
    home = ollama_home / ".ollama"
    key = ollama.ensure_keypair(home)
    (home / "id_ed25519.pub").unlink()
    capsys.readouterr()
    assert ollama.ensure_keypair(home).seed == key.seed
    assert (home / "id_ed25519.pub").read_text() == key.public_key_line() + "\n"
    assert capsys.readouterr().err == ""


@needs_ssh_keygen
def test_ensure_keypair_uses_a_key_made_by_ssh_keygen(ollama_home):
    home = ollama_home / ".ollama"
    home.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / "id_ed25519")], check=True)
    expected = (home / "id_ed25519.pub").read_text().split()[:2]
    assert ollama.ensure_keypair(home).public_key_line().split() == expected


def test_ensure_keypair_refuses_a_corrupt_key_instead_of_replacing_it(ollama_home):
    home = ollama_home / ".ollama"
    home.mkdir()
    (home / "id_ed25519").write_bytes(b"not a key\n")
    with pytest.raises(OllamaError, match="^ssh: no key found$"):
        ollama.ensure_keypair(home)
    assert (home / "id_ed25519").read_bytes() == b"not a key\n"


def test_exclusive_create_never_clobbers_an_existing_key(tmp_path):
    path = tmp_path / "keys" / "id_ed25519"
    path.parent.mkdir()
    path.write_bytes(b"theirs")
    assert ollama._create_exclusive(path, b"ours", 0o600) is False
    assert path.read_bytes() == b"theirs"
    assert os.listdir(path.parent) == ["id_ed25519"]


# -- registry auth ---------------------------------------------------------------

EMPTY_SHA256_HEX = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_sign_challenge_header_is_pubkey_colon_signature_of_ollamas_string():
    key = Ed25519Key.generate()
    url = "https://registry.example/v2/token?nonce=abc&scope=repository%3Alibrary%2Fx%3Apull&service=reg&ts=1700000000"
    header = ollama.sign_challenge(key, "GET", url)
    pub, sig = header.split(":")
    assert pub == key.authorized_key_b64()
    raw = base64.b64decode(sig, validate=True)
    assert len(raw) == 64
    signed = "GET,%s,%s" % (url, base64.b64encode(EMPTY_SHA256_HEX.encode()).decode())
    assert Ed25519Key.verify(key.public, signed.encode(), raw)
    assert not Ed25519Key.verify(key.public, ("POST" + signed[3:]).encode(), raw)


def test_sign_challenge_hashes_the_body():
    key = Ed25519Key.generate()
    raw = base64.b64decode(ollama.sign_challenge(key, "POST", "http://h/t", b"{}").split(":")[1])
    body_hash = base64.b64encode(hashlib.sha256(b"{}").hexdigest().encode()).decode()
    assert Ed25519Key.verify(key.public, ("POST,http://h/t,%s" % body_hash).encode(), raw)


def test_sign_auth_signs_raw_data():
    key = Ed25519Key.generate()
    pub, sig = ollama.sign_auth(key, "GET,/api/tags?ts=1700000000").split(":")
    assert pub == key.authorized_key_b64()
    assert Ed25519Key.verify(key.public, b"GET,/api/tags?ts=1700000000", base64.b64decode(sig))
