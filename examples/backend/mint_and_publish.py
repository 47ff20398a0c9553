"""A backend's two jobs with crier, in Python 3 with the standard library only:
    python3 mint_and_publish.py token <user>              prints a client token (HS256)
    python3 mint_and_publish.py publish <channel> <json>  publishes through the REST API
Settings from the environment: CRIER_JWT_SECRET (the node's jwt_secret), CRIER_URL
(e.g. http://127.0.0.1:8080), CRIER_API_KEY (one of the node's api_keys).
With PyJWT installed, `jwt.encode(claims, secret, algorithm="HS256")` does what mint_token does."""
import base64
import hashlib
import hmac
import json
import os
import sys
import time
import urllib.error
import urllib.request


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint_token(secret: str, user: str, channels=None, publish=(), ttl_seconds=3600) -> str:
    now = int(time.time())
    claims = {
        "sub": user,
        "iat": now,
        "exp": now + ttl_seconds,
        "channels": list(channels if channels is not None else [f"user:{user}"]),
        "publish": list(publish),
    }
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64url(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(signature)}"


def publish(base_url: str, api_key: str, channel: str, data) -> dict:
    req = urllib.request.Request(
        f"{base_url}/api/v1/publish",
        data=json.dumps({"channel": channel, "data": data}).encode(),
        headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            return json.load(res)  # {channel, epoch, offset}
    except urllib.error.HTTPError as e:
        body = json.load(e)
        raise RuntimeError(f"publish failed: {e.code} {body['error']}: {body['message']}") from None


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "token":
        user = sys.argv[2]
        print(mint_token(os.environ["CRIER_JWT_SECRET"], user, channels=["chat:*", f"user:{user}"], publish=["chat:*"]))
    elif len(sys.argv) == 4 and sys.argv[1] == "publish":
        print(json.dumps(publish(os.environ["CRIER_URL"], os.environ["CRIER_API_KEY"], sys.argv[2], json.loads(sys.argv[3]))))
    else:
        sys.exit("usage: mint_and_publish.py token <user> | publish <channel> <json>")
