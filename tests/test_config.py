"""The one configuration object: a TOML file, flags over it, and a clear error for anything it cannot use."""

import re
import subprocess
import sys

import pytest

from shared.config import Config, load_config


def test_flags_override_the_file_and_values_take_their_fields_types(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('model = "m.gguf"\nexpert_hosts = 2\ncuda_graphs = false\ngpu_expert_budget = "4GB"\n')
    config = load_config(path, expert_hosts="3", cuda_graphs="on", decode_crossings=None)
    assert (config.model, config.expert_hosts, config.cuda_graphs) == ("m.gguf", 3, True)
    assert config.gpu_expert_budget == 4 * 1000**3
    assert config.decode_crossings is True  # None leaves the default
    assert load_config(path, cuda_graphs="0").cuda_graphs is False


@pytest.mark.parametrize("word", ["ture", "2", "enabled", ""])
def test_a_word_that_is_not_a_boolean_is_an_error_not_false(word):
    with pytest.raises(ValueError, match=f"cuda_graphs: '{word}' is not a valid bool"):
        load_config(None, cuda_graphs=word)


def test_unknown_keys_and_bad_toml_name_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('model = "m.gguf"\nexpert_host = 2\n')
    with pytest.raises(ValueError, match=r"c\.toml: unknown config key\(s\): expert_host"):
        load_config(path)
    path.write_text("model = \n")
    with pytest.raises(ValueError, match=r"c\.toml: not valid TOML"):
        load_config(path)
    path.write_bytes(b"\xff\xfe")  # not UTF-8: the bare codec error named neither the file nor the config
    with pytest.raises(ValueError, match=r"c\.toml: not valid TOML: 'utf-8' codec can't decode"):
        load_config(path)
    with pytest.raises(ValueError, match="unknown config key 'modle'"):
        load_config(None, modle="m.gguf")


def test_tierserve_up_exits_with_the_message_alone(tmp_path):
    run = subprocess.run([sys.executable, "-m", "shared.cli", "up", "--decode-crossings", "ture"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert run.stderr.strip() == "tierserve: config decode_crossings: 'ture' is not a valid bool"


@pytest.mark.parametrize("command", ["up", "coordinator", "gpu-worker", "expert-host"])
def test_help_lists_every_setting_a_flag_takes(command):
    """--help showed --config alone: no --model, which up requires, nor any other setting's flag."""
    run = subprocess.run([sys.executable, "-m", "shared.cli", command, "--help"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    flags = {word.rstrip(",") for word in run.stdout.split() if word.startswith("--")}
    assert {"--" + name.replace("_", "-") for name in Config.__dataclass_fields__} <= flags
    assert "default: 4096" in run.stdout  # prefill_chunk's


def test_tierserve_up_leaves_a_config_file_in_its_run_dir_as_it_was(tmp_path):
    """The config it hands its children went to run_dir/config.toml: a config.toml of the user's there (its own
    --config, say) was replaced by it and then removed."""
    path = tmp_path / "config.toml"
    text = f'# mine\nmodel = "{tmp_path}/missing.gguf"\nrun_dir = "{tmp_path}"\nexpert_hosts = 0\nmetrics_port = 0\n'
    path.write_text(text)
    run = subprocess.run([sys.executable, "-m", "shared.cli", "up", "--config", str(path), "--log-level", "error"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1  # the model is missing: a child exits during start-up
    assert path.read_text() == text
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]


@pytest.mark.parametrize(("key", "value"), [("cold_path", "gpu"), ("soft_policy", "lfu"), ("log_level", "verbose"),
                                            ("log_level", "notset"), ("log_level", "warn")])
def test_a_value_no_process_can_use_is_refused_at_load(key, value):
    """Each once passed the load and stopped a role at start-up with a traceback (cold_path and soft_policy the
    gpu worker's, and only with soft slots; log_level every process's)."""
    with pytest.raises(ValueError, match=f"{key} must be one of .*, not '{value}'"):
        load_config(None, **{key: value})
    assert load_config(None, cold_path="stream", soft_policy="lru", log_level="debug").log_level == "debug"


@pytest.mark.parametrize(("key", "value", "text"), [
    ("kv_block_size", 0, "kv_block_size must be >= 1, not 0"),
    ("max_running", 0, "max_running must be >= 1, not 0"),
    ("prefill_chunk", -4, "prefill_chunk must be >= 1, not -4"),
    ("threads", -1, "threads must be >= 0, not -1"),
    ("hot_experts", -2, "hot_experts must be >= -1, not -2"),
    ("resume_timeout_s", -1.0, r"resume_timeout_s must be >= 0, not -1\.0"),
    ("metrics_port", 70000, r"metrics_port must be a TCP port \(<= 65535\), not 70000"),
])
def test_a_number_out_of_its_range_is_refused_at_load_naming_its_key(key, value, text):
    """A zero block size divided by zero in the worker; others failed a role later, or acted as no setting says."""
    with pytest.raises(ValueError, match=text):
        load_config(None, **{key: value})


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_timeout_that_is_not_a_finite_number_is_refused_at_load(value):
    """NaN passed every range check (each comparison with it is false): a role started with a resume timeout that
    never ends, or ended at once."""
    with pytest.raises(ValueError, match=f"resume_timeout_s must be a finite number, not {value}"):
        load_config(None, resume_timeout_s=value)


@pytest.mark.parametrize("endpoint", ["garbage", "localhost:5555", "udp://127.0.0.1:5", "tcp://127.0.0.1",
                                      "tcp://127.0.0.1:99999", "ipc://", "tcp://127.0.0.1:00", "tcp://[::1]:5555",
                                      "tcp://::1:5555"])
def test_a_client_endpoint_zeromq_cannot_take_is_refused_at_load(endpoint):
    """`tierserve up` died of a ZMQError traceback as it first connected; port 99999 was bound as 34463 (ZeroMQ
    takes it modulo 65536), while up said the system was ready on 99999. Port 00 (libzmq reads ports with atoi and
    refuses a 0 not written "0") and an IPv6 address (without the IPV6 socket option) passed here and failed only at
    the bind, as "Invalid argument" and "No such device"."""
    with pytest.raises(ValueError, match=re.escape(
            "client_endpoint must be tcp://HOST:PORT (HOST not an IPv6 address, PORT 0-65535 or *) or ipc://PATH, "
            f"not '{endpoint}'")):
        load_config(None, client_endpoint=endpoint)
    for good in ("tcp://*:5555", "tcp://127.0.0.1:0", "tcp://127.0.0.1:65535", "tcp://127.0.0.1:05555",
                 "tcp://localhost:*", "ipc:///tmp/c.sock"):
        assert load_config(None, client_endpoint=good).client_endpoint == good


def test_a_run_dir_too_long_for_its_socket_files_is_refused_at_load(tmp_path):
    """The coordinator said why it could not bind; the worker and the hosts died of ZMQError tracebacks."""
    run_dir = tmp_path / ("d" * (107 - len(str(tmp_path)) - len("/") - len("/expert-host-9.sock")))
    with pytest.raises(ValueError, match=f"run_dir {run_dir} is too long for a socket file: {run_dir}/expert-host-10"
                                         r"\.sock is over 107 bytes"):
        load_config(None, run_dir=str(run_dir), expert_hosts=11)
    assert load_config(None, run_dir=str(run_dir), expert_hosts=10).run_dir == str(run_dir)  # 107 bytes: taken
    with pytest.raises(ValueError, match="client_endpoint is too long for a socket file"):
        load_config(None, client_endpoint=f"ipc://{tmp_path}/{'c' * 107}")


def test_more_threads_than_cpus_are_held_to_the_cpus_with_a_warning(tmp_path):
    """host_threads 100000 took every thread an expert host could start: it died of a traceback as it started its
    metrics server."""
    code = ("import os, torch\n"
            "from shared.config import Config\n"
            "from shared.process import setup_process\n"
            f"setup_process('expert-host-0', 'expert_host', Config(host_threads=100000, expert_hosts=1, "
            f"run_dir={str(tmp_path)!r}))\n"
            "print(torch.get_num_threads(), len(os.sched_getaffinity(0)))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    threads, cpus = run.stdout.split()
    assert threads == cpus
    assert f"WARNING threads / host_threads ask for 100000 torch threads: using {cpus}, the CPUs this process may " \
        "run on" in run.stderr


def test_metrics_ports_above_65535_for_the_worker_or_a_host_are_refused_at_load():
    """The worker serves its metrics at metrics_port + 1 and expert host i at + 2 + i: with metrics_port 65534 and
    two hosts, the hosts died at start-up with an OverflowError from bind()."""
    with pytest.raises(ValueError, match=r"metrics_port 65534 leaves expert host 1 no TCP port \(65537\)"):
        load_config(None, metrics_port=65534, expert_hosts=2)
    with pytest.raises(ValueError, match=r"metrics_port 65535 leaves the gpu worker no TCP port \(65536\)"):
        load_config(None, metrics_port=65535, expert_hosts=0)
    assert load_config(None, metrics_port=65532, expert_hosts=2).metrics_port_for("expert_host", 1) == 65535


@pytest.mark.parametrize(("key", "value"), [("expert_hosts", "true"), ("kv_cache_tokens", "2.5"), ("model", "5"),
                                            ("client_endpoint", '["tcp://a:1"]')])
def test_a_toml_value_of_the_wrong_type_is_refused(tmp_path, key, value):
    """true was taken as 1 host and 5 as a model file named "5"."""
    path = tmp_path / "c.toml"
    path.write_text(f"{key} = {value}\n")
    with pytest.raises(ValueError, match=f"config {key}: .* is not a valid"):
        load_config(path)


@pytest.mark.parametrize("key", ["expert_timeout_s", "drain_timeout_s"])
def test_a_toml_boolean_is_no_number_of_seconds(tmp_path, key):
    """true was read as 1.0 s and false as 0 s (an int setting refused them)."""
    path = tmp_path / "c.toml"
    path.write_text(f"{key} = true\n")
    with pytest.raises(ValueError, match=f"config {key}: True is not a valid float"):
        load_config(path)


def test_a_size_too_large_is_refused_by_name():
    """400 digits ended in an OverflowError traceback, and a max_request_bytes past 2^59 in one from ZeroMQ as the
    coordinator set its frame limit (16 times the setting)."""
    with pytest.raises(ValueError, match="gpu_expert_budget: not a size: '9{400}' is too large"):
        load_config(None, gpu_expert_budget="9" * 400)
    with pytest.raises(ValueError, match=r"max_request_bytes must be <= 1099511627776 \(1 TiB\), not 10{18}"):
        load_config(None, max_request_bytes="1000000TB")
    assert load_config(None, max_request_bytes="1TiB").max_request_bytes == 1 << 40


@pytest.mark.parametrize(("key", "value"), [("gpu_expert_budget", "1.5.3GB"), ("mailbox_bytes", "lots"),
                                            ("host_memory_floor", "2..5GiB")])
def test_a_size_it_cannot_read_names_its_key(key, value):
    with pytest.raises(ValueError, match=rf"{key}: not a size: '{value}' \(examples"):
        load_config(None, **{key: value})


def test_a_floor_of_host_memory_in_bytes_is_a_toml_number_as_it_is_a_flag(tmp_path):
    """`--host-memory-floor 0` was taken and `host_memory_floor = 0` in the file refused as "not a valid str",
    where every other size takes a number of bytes."""
    path = tmp_path / "c.toml"
    path.write_text("host_memory_floor = 0\n")
    assert load_config(path) == load_config(None, host_memory_floor="0")
    path.write_text("host_memory_floor = true\n")
    with pytest.raises(ValueError, match="config host_memory_floor: True is not a valid str"):
        load_config(path)


@pytest.mark.parametrize(("interval", "timeout"), [(1.0, 0.5), (1.0, 1.0), (0.0, 3.0)])
def test_a_heartbeat_timeout_not_above_the_interval_is_refused(interval, timeout):
    """Accepted, it had the coordinator take every member for lost between two of its heartbeats, and back at the
    next, for as long as the system ran."""
    with pytest.raises(ValueError, match="heartbeat_timeout_s .* must be above heartbeat_interval_s"):
        load_config(None, heartbeat_interval_s=interval, heartbeat_timeout_s=timeout)
    assert load_config(None, heartbeat_interval_s=0.1, heartbeat_timeout_s=1.0).heartbeat_timeout_s == 1.0


def test_to_toml_reads_back_as_the_same_config_whatever_its_strings_hold(tmp_path):
    """The launcher hands its children the config as this file: a path with a newline, a tab, quotes or a
    backslash wrote a file no child could read."""
    config = Config(model='/tmp/a "b"\\c\nd\te\x7f/é.gguf', run_dir=str(tmp_path), log_level="debug")
    path = tmp_path / "c.toml"
    path.write_text(config.to_toml())
    assert load_config(path) == config


def test_more_running_requests_than_a_step_has_tokens_is_refused_at_load():
    """Each running request decodes one token a step; accepted, the gpu worker died at start-up with a traceback."""
    with pytest.raises(ValueError, match=r"max_running \(64\) must not be above max_batch_tokens \(32\)"):
        load_config(None, max_running=64, max_batch_tokens=32)
    assert load_config(None, max_running=32, max_batch_tokens=32).max_running == 32
