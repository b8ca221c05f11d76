"""``edgekit flash --host``: a real sshd on loopback, the copy checked on the "device", its agent's verdict."""

from __future__ import annotations

import hashlib
import json

import pytest

from edgekit.flash.ssh import (FlashError, HostKeyChangedError, SSHAuthError, SSHTarget, UnknownHostKeyError,
                               flash_over_ssh, parse_target)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """No ~/.ssh or ssh-agent of whoever runs the tests: only the keys a test names are used."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return home


@pytest.fixture
def real_agent(device):
    """This checkout's ``edgekit-agent`` (through a wrapper script)."""
    assert device.agent_supports_sha256
    return device.agent


def flash(sshd, device, bundle, **kw):
    kw.setdefault("identity", sshd.identity)
    kw.setdefault("known_hosts", sshd.known_hosts)
    agent = kw.pop("agent", None)
    return flash_over_ssh(bundle, kw.pop("target", sshd.target), **device.flash_kwargs(agent, **kw))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- targets
@pytest.mark.parametrize("text, port, expected", [
    ("pi@board", None, SSHTarget("pi", "board", 22)),
    ("pi@board:2222", None, SSHTarget("pi", "board", 2222)),
    ("board", 2200, SSHTarget("me", "board", 2200)),
    ("pi@board:2222", 2222, SSHTarget("pi", "board", 2222)),
    ("[fe80::1]:2222", None, SSHTarget("me", "fe80::1", 2222)),
    ("root@[::1]", None, SSHTarget("root", "::1", 22)),
    ("::1", None, SSHTarget("me", "::1", 22)),
    ("ssh://pi@10.0.0.7:22/", None, SSHTarget("pi", "10.0.0.7", 22)),
    ("Pi@Jetson-01.Local:2222", None, SSHTarget("Pi", "jetson-01.local", 2222)),  # hosts lowercased, like OpenSSH
    ("[FE80::A]", None, SSHTarget("me", "fe80::a", 22)),
])
def test_parse_target(monkeypatch, text, port, expected):
    monkeypatch.setattr("getpass.getuser", lambda: "me")
    assert parse_target(text, port) == expected


@pytest.mark.parametrize("text, port, words", [
    ("pi@board:22x", None, "not a number"),
    ("pi@board:70000", None, "not a number"),
    ("@board", None, "user name"),
    ("pi@", None, "no host"),
    ("[::1", None, "IPv6"),
    ("pi@board:2222", 2200, "give the port once"),
    ("pi@bo ard", None, "bad SSH target"),
])
def test_parse_target_refuses(text, port, words):
    with pytest.raises(FlashError, match=words):
        parse_target(text, port)


def test_target_names_match_openssh():
    assert SSHTarget("pi", "board", 22).known_hosts_name == "board"
    assert SSHTarget("pi", "board", 2222).known_hosts_name == "[board]:2222"
    assert SSHTarget("pi", "Board", 2222).known_hosts_name == "[board]:2222"  # the name OpenSSH records
    assert str(SSHTarget("pi", "fe80::1", 2222)) == "pi@[fe80::1]:2222"


# ----------------------------------------------------------------------------- copy
def test_copy_lands_and_the_agent_gets_the_contract(sshd, device):
    bundle = device.bundle()
    seen = []
    result = flash(sshd, device, bundle, allow_downgrade=True, progress=lambda done, total: seen.append((done, total)),
                   keep_upload=True)
    digest = device.sha256_of(bundle)
    size = bundle.stat().st_size
    assert result["ok"] is True
    assert result["sha256"] == digest and result["size"] == size
    assert result["remote_path"] == f"{device.remote_dir}/{digest}.ekb"
    assert device.sha256_of(device.remote_dir / f"{digest}.ekb") == digest
    assert not (device.remote_dir / f"{digest}.ekb.part").exists()
    assert (device.remote_dir.stat().st_mode & 0o777) == 0o755  # the agent's own user must read uploads
    assert all((p.stat().st_mode & 0o777) == 0o644 for p in device.remote_dir.iterdir())
    assert result["resumed_from"] == 0 and result["bytes_sent"] == size and result["reconnects"] == 0
    assert result["upload_removed"] is False  # keep_upload
    assert result["host_key"] == {"type": "ssh-ed25519", "fingerprint": sshd.fingerprint, "added_to": None}
    assert result["agent"]["stub"] is True
    assert seen[-1] == (size, size) and len(seen) > 10
    assert device.stub_calls() == [["install", result["remote_path"], "--config", str(device.config), "--json",
                                    "--sha256", digest, "--allow-downgrade"]]


def test_a_bundle_already_on_the_device_is_not_sent_again(sshd, device):
    bundle = device.bundle()
    flash(sshd, device, bundle, keep_upload=True)
    again = flash(sshd, device, bundle)
    assert again["ok"] is True and again["already_on_device"] is True
    assert again["bytes_sent"] == 0
    assert len(device.stub_calls()) == 2 and "--allow-downgrade" not in device.stub_calls()[1]
    assert again["upload_removed"] is True and list(device.remote_dir.iterdir()) == []


@pytest.mark.parametrize("damage", ["same size", "shorter"])
def test_a_bundle_file_already_there_is_hashed_on_the_device_before_it_is_used(sshd, device, damage):
    """A ``<sha256>.ekb`` left in the upload folder is not trusted by its name: a damaged one is replaced."""
    bundle = device.bundle()
    data = bundle.read_bytes()
    device.remote_dir.mkdir(mode=0o700)
    wrong = bytearray(data if damage == "same size" else data[:len(data) // 2])
    wrong[100] ^= 0xFF
    (device.remote_dir / f"{sha(data)}.ekb").write_bytes(bytes(wrong))
    result = flash(sshd, device, bundle, keep_upload=True)
    assert result["ok"] is True  # the stub agent checks --sha256 on what it was given
    assert result["already_on_device"] is False and result["bytes_sent"] == len(data)
    assert (device.remote_dir / f"{sha(data)}.ekb").read_bytes() == data


def test_the_upload_is_removed_once_the_agent_answered(sshd, device):
    bundle = device.bundle()
    digest = device.sha256_of(bundle)
    result = flash(sshd, device, bundle)
    assert result["ok"] is True and result["upload_removed"] is True
    assert list(device.remote_dir.iterdir()) == []  # neither <sha>.ekb nor a .part is left
    # a refusal is an answer too: the agent has (and discarded) its own copy
    refusing = device.root / "bin" / "refusing-agent"
    answer = {"ok": False, "error": {"reason": "downgrade", "step": "verify", "code": 111, "name": "DOWNGRADE",
                                     "message": "release 1 is older than the active release 2"}}
    refusing.write_text(f"#!/bin/sh\necho '{json.dumps(answer)}'\nexit 4\n")
    refusing.chmod(0o755)
    refused = flash(sshd, device, bundle, agent=refusing)
    assert refused["ok"] is False and refused["agent"]["error"]["reason"] == "downgrade"
    assert refused["upload_removed"] is True and not (device.remote_dir / f"{digest}.ekb").exists()


def test_the_upload_stays_when_no_answer_came(sshd, device):
    """No answer from the agent (here: it prints no JSON): the copy stays, so the next run does not upload again."""
    bundle = device.bundle()
    digest = device.sha256_of(bundle)
    broken = device.root / "bin" / "broken-agent"
    broken.write_text("#!/bin/sh\necho 'Traceback: something broke' >&2\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(FlashError, match="without a JSON reply"):
        flash(sshd, device, bundle, agent=broken)
    assert device.sha256_of(device.remote_dir / f"{digest}.ekb") == digest
    again = flash(sshd, device, bundle)
    assert again["ok"] is True and again["already_on_device"] is True and again["bytes_sent"] == 0
    assert again["upload_removed"] is True and not (device.remote_dir / f"{digest}.ekb").exists()


def test_resumes_from_the_partial_copy(sshd, device):
    bundle = device.bundle()
    data = bundle.read_bytes()
    half = len(data) // 2
    device.remote_dir.mkdir(mode=0o700)
    (device.remote_dir / f"{sha(data)}.ekb.part").write_bytes(data[:half])
    result = flash(sshd, device, bundle, keep_upload=True)
    assert result["ok"] is True
    assert result["resumed_from"] == half
    assert result["bytes_sent"] == len(data) - half
    assert result["restarted_after_mismatch"] is False
    assert (device.remote_dir / f"{sha(data)}.ekb").read_bytes() == data


def test_a_corrupted_partial_copy_is_sent_again_from_zero(sshd, device):
    bundle = device.bundle()
    data = bundle.read_bytes()
    half = len(data) // 2
    device.remote_dir.mkdir(mode=0o700)
    wrong = bytearray(data[:half])
    wrong[1000] ^= 0xFF
    (device.remote_dir / f"{sha(data)}.ekb.part").write_bytes(bytes(wrong))
    result = flash(sshd, device, bundle, keep_upload=True)
    assert result["ok"] is True
    assert result["resumed_from"] == half and result["restarted_after_mismatch"] is True
    assert result["bytes_sent"] == (len(data) - half) + len(data)
    assert (device.remote_dir / f"{sha(data)}.ekb").read_bytes() == data


def test_a_longer_stale_part_is_replaced(sshd, device):
    bundle = device.bundle(padding=0)
    data = bundle.read_bytes()
    device.remote_dir.mkdir(mode=0o700)
    (device.remote_dir / f"{sha(data)}.ekb.part").write_bytes(data + b"junk")
    result = flash(sshd, device, bundle, keep_upload=True)
    assert result["ok"] is True and result["resumed_from"] == 0 and result["bytes_sent"] == len(data)
    assert (device.remote_dir / f"{sha(data)}.ekb").read_bytes() == data


def test_a_dropped_connection_is_remade_and_the_copy_resumes(sshd, device, flaky_proxy):
    bundle = device.bundle()
    size = bundle.stat().st_size
    proxy = flaky_proxy(sshd.port, cuts=[size // 3, size // 3])  # two cuts mid-copy, then a good link
    seen = []
    result = flash(sshd, device, bundle, target=f"{sshd.user}@127.0.0.1:{proxy.port}",
                   known_hosts=sshd.known_hosts_file(proxy.port), progress=lambda done, total: seen.append(done),
                   keep_upload=True)
    assert result["ok"] is True
    assert result["reconnects"] == 2 and proxy.connections == 3
    restarts = [now for before, now in zip(seen, seen[1:]) if now <= before]  # first write of a new connection
    assert len(restarts) == 2
    # each new connection went on from what had reached the device (each cut lets ~1/3 of the file through,
    # less the handshake and the block it swallowed), not from 0 (which would show as 32768)
    assert restarts[0] > size // 8 and restarts[1] - restarts[0] > size // 8
    assert seen[-1] == size
    assert device.sha256_of(device.remote_dir / f"{result['sha256']}.ekb") == result["sha256"]


def test_gives_up_after_the_retries(sshd, device, flaky_proxy):
    bundle = device.bundle()
    size = bundle.stat().st_size
    proxy = flaky_proxy(sshd.port, cuts=[size // 4] * 5)
    with pytest.raises(FlashError, match="lost the connection .* 2 times while copying.*again to resume"):
        flash(sshd, device, bundle, target=f"{sshd.user}@127.0.0.1:{proxy.port}", retries=1,
              known_hosts=sshd.known_hosts_file(proxy.port))
    assert proxy.connections == 2
    part = device.remote_dir / f"{device.sha256_of(bundle)}.ekb.part"
    assert 0 < part.stat().st_size < size  # left for the next run to resume
    assert device.stub_calls() == []


# ----------------------------------------------------------------------------- host keys and login
def test_unknown_host_key_is_refused_with_its_fingerprint(sshd, device, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(UnknownHostKeyError) as err:
        flash(sshd, device, device.bundle(padding=0), known_hosts=empty)
    message = str(err.value)
    assert sshd.fingerprint in message and err.value.fingerprint == sshd.fingerprint
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {empty}" in message
    assert "--accept-new-host-key" in message
    assert empty.read_text() == ""
    assert not device.remote_dir.exists()  # nothing happened on the device


def test_accept_new_host_key_records_it(sshd, device, tmp_path):
    other = sshd.keygen(tmp_path / "other_host")
    kind, b64 = other.with_name(other.name + ".pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"# mine\n[elsewhere]:22 {kind} {b64}")  # no final newline: the new line must not join it
    result = flash(sshd, device, device.bundle(padding=0), known_hosts=known, accept_new_host_key=True)
    assert result["ok"] is True and result["host_key"]["added_to"] == str(known)
    lines = known.read_text().splitlines()
    assert lines[0] == "# mine" and len(lines) == 3
    assert lines[2] == sshd.known_hosts_line.strip()
    again = flash(sshd, device, device.bundle(padding=0), known_hosts=known)  # now known, without the flag
    assert again["ok"] is True and again["host_key"]["added_to"] is None
    assert len(known.read_text().splitlines()) == 3


def test_accept_new_host_key_defaults_to_the_users_known_hosts(sshd, device, isolated_home):
    result = flash(sshd, device, device.bundle(padding=0), known_hosts=None, accept_new_host_key=True)
    user_file = isolated_home / ".ssh" / "known_hosts"
    assert result["host_key"]["added_to"] == str(user_file)
    assert user_file.read_text() == sshd.known_hosts_line
    assert (user_file.stat().st_mode & 0o777) == 0o600
    assert flash(sshd, device, device.bundle(padding=0), known_hosts=None)["ok"] is True  # read from there


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa"])
def test_a_changed_host_key_is_refused_even_with_accept_new(sshd, device, tmp_path, kind):
    other = sshd.keygen(tmp_path / f"other_{kind}", kind)
    known = tmp_path / "known_hosts"
    known.write_text(sshd.line_for(sshd.port, (tmp_path / f"other_{kind}.pub").read_text().split()[:2]))
    before = known.read_text()
    with pytest.raises(HostKeyChangedError) as err:
        flash(sshd, device, device.bundle(padding=0), known_hosts=known, accept_new_host_key=True)
    message = str(err.value)
    assert "CHANGED" in message and sshd.fingerprint in message
    assert sshd.fingerprint_of(other.with_name(other.name + ".pub")) in message
    assert "ssh-keygen -R" in message
    assert known.read_text() == before
    assert not device.remote_dir.exists()


def test_host_names_are_compared_case_insensitively_like_openssh(sshd, device, tmp_path):
    """`LocalHost` is the host recorded as `localhost`: a different key is a CHANGED key, never a new host."""
    other = sshd.keygen(tmp_path / "recorded")
    known = tmp_path / "known_hosts"
    recorded = " ".join(other.with_name(other.name + ".pub").read_text().split()[:2])
    known.write_text(f"[localhost]:{sshd.port} {recorded}\n")  # what `ssh` records (always lowercase)
    before = known.read_text()
    for name in ("localhost", "LocalHost", "LOCALHOST"):
        with pytest.raises(HostKeyChangedError, match=rf"\[localhost\]:{sshd.port} has CHANGED"):
            flash(sshd, device, device.bundle(padding=0), target=f"{sshd.user}@{name}:{sshd.port}",
                  known_hosts=known, accept_new_host_key=True)
    assert known.read_text() == before and not device.remote_dir.exists()
    # a name on record in another case (hand-written, or by an older edgekit) is the same host too
    known.write_text(f"[LocalHost]:{sshd.port} {' '.join(sshd.host_key_pub)}\n")
    result = flash(sshd, device, device.bundle(padding=0), target=f"{sshd.user}@localHOST:{sshd.port}",
                   known_hosts=known)
    assert result["ok"] is True and result["host_key"]["added_to"] is None
    assert result["host"] == f"{sshd.user}@localhost:{sshd.port}"
    # and a new host is recorded under its lowercase name, as `ssh` would record it
    fresh = tmp_path / "known_hosts.new"
    flash(sshd, device, device.bundle(padding=0), target=f"{sshd.user}@LocalHost:{sshd.port}", known_hosts=fresh,
          accept_new_host_key=True)
    assert fresh.read_text() == f"[localhost]:{sshd.port} {' '.join(sshd.host_key_pub)}\n"


def test_a_malformed_known_hosts_is_a_clear_error(sshd, device, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text("[127.0.0.1]:22 ssh-ed25519 not*base64\n")
    with pytest.raises(FlashError, match="cannot read known_hosts.*fix or remove the bad line"):
        flash(sshd, device, device.bundle(padding=0), known_hosts=known)


def test_the_users_known_hosts_is_read_too(sshd, device, isolated_home):
    (isolated_home / ".ssh").mkdir()
    (isolated_home / ".ssh" / "known_hosts").write_text(sshd.known_hosts_line)
    assert flash(sshd, device, device.bundle(padding=0), known_hosts=None)["ok"] is True


def test_a_wrong_identity_is_a_clear_auth_error(sshd, device, tmp_path):
    wrong = sshd.keygen(tmp_path / "not_authorised")
    with pytest.raises(SSHAuthError, match=f"{sshd.user}@127.0.0.1:{sshd.port} refused the SSH login with "
                                           f"identity {wrong}.*ssh-copy-id"):
        flash(sshd, device, device.bundle(padding=0), identity=wrong)
    assert not device.remote_dir.exists()


def test_without_identity_or_agent_or_default_keys_login_fails_clearly(sshd, device):
    with pytest.raises(SSHAuthError, match="ssh-agent and default keys"):
        flash(sshd, device, device.bundle(padding=0), identity=None)


def test_a_default_key_in_home_is_used(sshd, device, isolated_home):
    (isolated_home / ".ssh").mkdir()
    (isolated_home / ".ssh" / "id_ed25519").write_bytes(sshd.identity.read_bytes())
    assert flash(sshd, device, device.bundle(padding=0), identity=None)["ok"] is True


def test_a_missing_identity_file_is_reported_before_connecting(sshd, device, tmp_path):
    with pytest.raises(SSHAuthError, match="does not exist"):
        flash(sshd, device, device.bundle(padding=0), identity=tmp_path / "nope")


def test_nobody_listening_is_a_clear_error(sshd, device):
    sshd.stop()
    with pytest.raises(FlashError, match=f"cannot connect to .*:{sshd.port} over SSH"):
        flash(sshd, device, device.bundle(padding=0))


# ----------------------------------------------------------------------------- the device's agent
def test_a_missing_agent_command_says_what_to_do(sshd, device, tmp_path):
    with pytest.raises(FlashError, match=r"cannot be run on .*exit 127.*--agent-command.*firmware/bootstrap\.sh"):
        flash(sshd, device, device.bundle(padding=0), agent=tmp_path / "no-such-agent")


def test_an_agent_that_prints_no_json_is_a_clear_error(sshd, device):
    noisy = device.root / "bin" / "noisy-agent"
    noisy.write_text("#!/bin/sh\necho 'hello'\necho 'something broke' >&2\nexit 1\n")
    noisy.chmod(0o755)
    with pytest.raises(FlashError, match="exited 1 without a JSON reply.*something broke.*--agent-command"):
        flash(sshd, device, device.bundle(padding=0), agent=noisy)


def test_an_agent_without_sha256_is_reported_as_too_old(sshd, device):
    old = device.root / "bin" / "old-agent"
    old.write_text("#!/bin/sh\necho 'edgekit-agent: error: unrecognized arguments: --sha256 abc' >&2\nexit 2\n")
    old.chmod(0o755)
    with pytest.raises(FlashError, match="too old.*update the runtime"):
        flash(sshd, device, device.bundle(padding=0), agent=old)


def test_agent_command_words_are_quoted(sshd, device):
    """``--agent-command`` may carry words (``sudo -n edgekit-agent``); each word reaches the device intact."""
    wrapper = device.root / "bin" / "with space"
    wrapper.write_text(f'#!/bin/sh\n[ "$1" = "--flag=a b" ] || exit 9\nshift\nexec "{device.stub_agent}" "$@"\n')
    wrapper.chmod(0o755)
    result = flash(sshd, device, device.bundle(padding=0), agent=f"'{wrapper}' '--flag=a b'")
    assert result["ok"] is True


def test_full_flash_installs_with_the_real_agent(sshd, device, real_agent):
    bundle = device.bundle()
    result = flash(sshd, device, bundle, agent=real_agent)
    assert result["ok"] is True, result
    assert result["agent"]["ok"] is True
    digest = device.sha256_of(bundle)
    assert device.active_bundle() is not None and device.sha256_of(device.active_bundle()) == digest
    assert any(device.sha256_of(b) == digest for b in device.slot_bundles())
    assert result["install_s"] > 0
    # the upload is gone; the agent serves from its own copy in its state directory
    assert result["upload_removed"] is True and list(device.remote_dir.iterdir()) == []


def test_the_agent_refusing_a_tampered_bundle_is_returned_not_raised(sshd, device, real_agent):
    good = device.bundle("good.ekb")
    assert flash(sshd, device, good, agent=real_agent)["ok"] is True
    result = flash(sshd, device, device.tampered(), agent=real_agent)
    assert result["ok"] is False
    error = result["agent"]["error"]
    assert error["code"] == 105 and error["name"] == "BUNDLE_TAMPERED", json.dumps(error)
    assert device.sha256_of(device.active_bundle()) == device.sha256_of(good)  # the running model stays
    assert result["upload_removed"] is True and list(device.remote_dir.iterdir()) == []


def test_edgekit_flash_host_command(sshd, device, real_agent):
    """The CLI end to end: `edgekit flash BUNDLE --host user@127.0.0.1:PORT` prints the result, exits 0/4."""
    import subprocess
    import sys

    def cli(bundle):
        cmd = [sys.executable, "-m", "edgekit.cli", "flash", str(bundle), "--host", sshd.target, "--port",
               str(sshd.port), "--identity", str(sshd.identity), "--known-hosts", str(sshd.known_hosts),
               "--agent-command", str(real_agent), "--agent-config", str(device.config), "--json"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    bundle = device.bundle("cli.ekb")
    out = cli(bundle)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["agent"]["ok"] and result["agent"]["slot"] == "a" and result["agent"]["health"]["ok"]
    assert device.sha256_of(device.active_bundle()) == device.sha256_of(bundle)
    refused = cli(device.tampered())
    assert refused.returncode == 4 and json.loads(refused.stdout)["agent"]["error"]["code"] == 105
    assert device.sha256_of(device.active_bundle()) == device.sha256_of(bundle)


def test_flash_shadow_installs_the_candidate_without_switching(sshd, device, real_agent):
    """`edgekit flash --host --shadow`: the candidate lands in the idle slot, health-checked, the active model
    stays; without --host the flag is refused (a fleet rollout switches devices)."""
    first = device.bundle("first.ekb", release=1)
    assert flash(sshd, device, first, agent=real_agent)["ok"] is True
    candidate = device.bundle("candidate.ekb", release=2)
    result = flash(sshd, device, candidate, agent=real_agent, shadow=True)
    assert result["ok"] is True and result["agent"]["shadow"] is True, result
    assert device.sha256_of(device.active_bundle()) == device.sha256_of(first)  # not switched
    shadow = json.loads((device.state_dir / "shadow").read_text())
    assert shadow["sha256"] == device.sha256_of(candidate)
    assert device.sha256_of(device.state_dir / "slots" / shadow["slot"] / "bundle.ekb") == shadow["sha256"]
    from typer.testing import CliRunner

    from edgekit.cli import app

    out = CliRunner().invoke(app, ["flash", str(candidate), "--fleet", "f1", "--shadow", "--json"])
    assert out.exit_code == 2 and "--host" in json.loads(out.stdout)["error"]["message"]
