#!/usr/bin/env python3
"""Rewrites deploy/nginx.conf and deploy/prometheus.yml (written for docker-compose) for the
loopback topology of deploy/local/up: upstream servers, scrape targets, listen addresses and file
paths change; every other directive is used as it is. Fails if a rewrite no longer matches, so
the two never drift apart silently. Standard library only."""

import argparse
import re
import sys


def sub(pattern, repl, text, count, what):
    new, n = re.subn(pattern, repl, text, flags=re.M)
    if n != count:
        sys.exit(f"render.py: expected {count} match(es) for {what} ({pattern!r}), found {n}")
    return new


def nginx(src, args):
    prefix = args.prefix.rstrip("/")
    ups = args.upstreams.split(",")
    text = sub(r"^pid .*;$", f"pid {prefix}/nginx.pid;", src, 1, "pid")
    text = sub(r"^error_log .*;$", f"error_log {prefix}/error.log warn;", text, 1, "error_log")
    text = sub(r"^(\s*)access_log \S+ crier;$", rf"\1access_log {prefix}/access.log crier;", text, 1, "access_log")
    text = sub(r"^(\s*)listen 80;$", rf"\1listen {args.listen};", text, 1, "listen")
    for i, up in enumerate(ups, 1):
        text = sub(rf"^(\s*)server crier{i}:8080 ", rf"\g<1>server {up} ", text, 1, f"upstream crier{i}")
    if re.search(r"server crier\d+:", text):
        sys.exit("render.py: deploy/nginx.conf has more upstream servers than given")
    temp = "".join(
        f"    {d}_temp_path {prefix}/tmp/{d};\n" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = sub(r"^http \{\n", "http {\n" + temp, text, 1, "http block")
    return text


def prometheus(src, args):
    targets = args.targets.split(",")
    text = sub(r"^(\s*)scrape_interval: \S+$", rf"\1scrape_interval: {args.interval}", src, 1, "scrape_interval")
    text = sub(r"^(\s*)evaluation_interval: \S+$", rf"\1evaluation_interval: {args.interval}", text, 1, "evaluation_interval")
    text = sub(r"^(\s*)- alerts\.yml$", rf"\1- {args.rules}", text, 1, "rule_files")
    for i, t in enumerate(targets, 1):
        text = sub(rf"^(\s*)- crier{i}:8080$", rf"\g<1>- {t}", text, 1, f"target crier{i}")
    if re.search(r"- crier\d+:8080", text):
        sys.exit("render.py: deploy/prometheus.yml has more targets than given")
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    sp = ap.add_subparsers(dest="kind", required=True)
    n = sp.add_parser("nginx")
    n.add_argument("src")
    n.add_argument("dst")
    n.add_argument("--listen", required=True)
    n.add_argument("--upstreams", required=True, help="comma list host:port, one per crierN")
    n.add_argument("--prefix", required=True, help="directory for pid, logs and temp files")
    p = sp.add_parser("prometheus")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--targets", required=True, help="comma list host:port, one per crierN")
    p.add_argument("--rules", required=True, help="absolute path of alerts.yml")
    p.add_argument("--interval", default="1s")
    args = ap.parse_args()
    with open(args.src) as f:
        src = f.read()
    out = nginx(src, args) if args.kind == "nginx" else prometheus(src, args)
    with open(args.dst, "w") as f:
        f.write(out)


if __name__ == "__main__":
    main()
