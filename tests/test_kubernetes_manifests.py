"""contrib/kubernetes checked by kubectl itself, client-side and offline (no cluster
is reachable here, and `apply`/`create --dry-run=client` need one for discovery
and the OpenAPI schema).  `kubectl set env --local` decodes a pod-template
object into kubectl's own typed Go structs and prints it back without asking
any server: a wrong kind, a field of the wrong type or a bad quantity fails the
decode, and a misspelt field is dropped by it, so every field we wrote must come
back unchanged."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any, Iterator

import pytest
import yaml

MANIFEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "contrib", "kubernetes", "gputrace-daemonset.yaml")
PROBE_ENV = "GTTEST_KUBECTL_CHECK"


def kubectl_round_trip(document: dict[str, Any], tmp_path: Any) -> dict[str, Any]:
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is not installed (Debian package kubectl; contrib/setup.sh test)")
    path = tmp_path / "object.yaml"
    path.write_text(yaml.safe_dump(document))
    done = subprocess.run(["kubectl", "set", "env", "--local", "-f", str(path), "-o", "json",
                           f"{PROBE_ENV}=1"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "KUBECONFIG": os.devnull})
    assert done.returncode == 0, done.stderr.strip()[-400:]
    return json.loads(done.stdout)


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from leaves(inner, f"{path}.{key}")
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            yield from leaves(inner, f"{path}[{i}]")
    else:
        yield path, value


def pod_template_documents() -> list[dict[str, Any]]:
    with open(MANIFEST, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    return [d for d in docs if d["kind"] in ("DaemonSet", "Deployment", "Job", "Pod")]


@pytest.mark.parametrize("document", pod_template_documents(), ids=lambda d: d["kind"])
def test_kubectl_decodes_the_manifest_and_keeps_every_field(document, tmp_path):
    back = kubectl_round_trip(document, tmp_path)
    out = dict(leaves(back))
    lost = [(p, v) for p, v in leaves(document) if out.get(p) != v]
    assert not lost, f"kubectl's typed decode dropped or changed: {lost[:5]}"


def test_the_check_fails_on_a_misspelt_field_and_a_wrong_type(tmp_path):
    """The check itself: what it must catch, it catches."""
    (document,) = pod_template_documents()
    misspelt = json.loads(json.dumps(document))
    sc = misspelt["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    sc["allowPrivilegeEscalaton"] = sc.pop("allowPrivilegeEscalation")
    out = dict(leaves(kubectl_round_trip(misspelt, tmp_path)))
    assert any(out.get(p) != v for p, v in leaves(misspelt))
    wrong = json.loads(json.dumps(document))
    wrong["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "metrics"
    with pytest.raises(AssertionError, match="cannot unmarshal"):
        kubectl_round_trip(wrong, tmp_path)
