"""`beam-api`: serve the REST API, or manage API keys as an administrator.

    beam-api serve [--host 0.0.0.0] [--port 8000]
    beam-api keys create --org ORG [--description TEXT]   # prints the key once
    beam-api keys revoke KEY_ID
    beam-api keys list
    beam-api openapi                                      # the published OpenAPI document

Kubernetes access comes from --kubeconfig, $KUBECONFIG, ~/.kube/config or the Pod's
ServiceAccount; the keys namespace from --keys-namespace or $BEAM_API_KEYS_NAMESPACE.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from kubernetes.client import CoreV1Api


def main(argv: list[str] | None = None) -> int:
    """Every error an administrator can cause (a bad organization id, no kubeconfig, an
    unreachable or refusing apiserver) is one line on stderr and a non-zero exit, never a
    traceback."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # the one place that turns any error into the one line
        print(f"beam-api: error: {_one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1


def _one_line(e: Exception) -> str:
    from kubernetes.client.exceptions import ApiException

    if isinstance(e, ApiException):
        try:
            message = json.loads(e.body or "{}").get("message") or e.reason
        except ValueError:
            message = e.reason
        return f"the apiserver answered HTTP {e.status}: {message}"
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, ValueError) else f"{type(e).__name__}: {text}"


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(
        prog="beam-api", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--kubeconfig", default=None)
    p.add_argument(
        "--keys-namespace",
        default=None,
        help="namespace of the API key Secrets (default $BEAM_API_KEYS_NAMESPACE or beam-system-api-keys, the chart's default)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", default=os.environ.get("BEAM_API_HOST", "0.0.0.0"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("BEAM_API_PORT", "8000")))
    sub.add_parser("openapi", help="print the OpenAPI document")
    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_cmd", required=True)
    create = keys.add_parser("create", help="create a key for an organization and print it (once)")
    create.add_argument("--org", required=True, help="organization id = its namespace")
    create.add_argument("--description", default="")
    revoke = keys.add_parser("revoke", help="delete a key")
    revoke.add_argument("key_id")
    keys.add_parser("list", help="list keys (ids and organizations, never the keys)")
    args = p.parse_args(argv)

    from beam_operator.api.app import Settings, create_app

    settings = Settings.from_env()
    if args.keys_namespace:
        settings.keys_namespace = args.keys_namespace

    if args.cmd == "serve":
        import uvicorn

        from beam_contract import logs

        # uvicorn's own loggers propagate to the root, which writes JSON in a Pod (log_config=None:
        # uvicorn configures nothing of its own).
        logs.configure("INFO")
        uvicorn.run(
            create_app(settings, args.kubeconfig),
            host=args.host,
            port=args.port,
            log_config=None,
            log_level="info",
            access_log=os.environ.get("BEAM_API_ACCESS_LOG", "1") != "0",
        )
        return 0
    if args.cmd == "openapi":
        from beam_operator.api.app import openapi_document

        print(json.dumps(openapi_document(), indent=2))
        return 0

    from beam_operator.api import keys as keymod
    from beam_operator.api.kube import api_client

    core = CoreV1Api(api_client(args.kubeconfig))
    ns = settings.keys_namespace
    if args.keys_cmd == "create":
        key, secret = keymod.create_key(core, ns, args.org, args.description)
        print(
            f"key_id {key.key_id} for organization {key.organization} (Secret {ns}/{keymod.SECRET_PREFIX}{key.key_id})",
            file=sys.stderr,
        )
        print("the key is shown only now; store it safely:", file=sys.stderr)
        print(secret)
        return 0
    if args.keys_cmd == "revoke":
        if keymod.revoke_key(core, ns, args.key_id):
            print(f"revoked {args.key_id} (running replicas stop accepting it within {settings.key_cache_seconds:g}s)")
            return 0
        print(f"no key {args.key_id} in namespace {ns}", file=sys.stderr)
        return 1
    for k in keymod.list_keys(core, ns):
        print(f"{k['key_id']}\t{k['organization']}\t{k['created_at']}\t{k['description']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
