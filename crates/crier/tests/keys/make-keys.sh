#!/usr/bin/env bash
# Regenerates the test key fixtures used by crates/crier/src/auth.rs unit tests.
# Needs: openssl (1.1.1+ / 3.x), xxd, base64, tr, head, tail.
# These keys are for tests only. Never use them for anything else.
set -euo pipefail
cd "$(dirname "$0")"

b64url() { base64 -w0 | tr '+/' '-_' | tr -d '='; }

# RSA 2048 (PKCS#8 private key, SPKI public key)
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out rsa_private.pem 2>/dev/null
openssl pkey -in rsa_private.pem -pubout -out rsa_public.pem

# EC P-256 (PKCS#8 private key, SPKI public key, named curve)
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
    -pkeyopt ec_param_enc:named_curve -out ec_private.pem
openssl pkey -in ec_private.pem -pubout -out ec_public.pem

# Ed25519
openssl genpkey -algorithm ed25519 -out ed25519_private.pem
openssl pkey -in ed25519_private.pem -pubout -out ed25519_public.pem

# JWKS with the RSA and EC public keys.
# RSA: n from the modulus (hex), e from the public exponent.
n_hex=$(openssl rsa -pubin -in rsa_public.pem -noout -modulus | sed 's/^Modulus=//')
n=$(printf '%s' "$n_hex" | xxd -r -p | b64url)
e_dec=$(openssl rsa -pubin -in rsa_public.pem -noout -text | sed -n 's/^Exponent: \([0-9]*\).*/\1/p')
e_hex=$(printf '%x' "$e_dec")
if [ $(( ${#e_hex} % 2 )) -eq 1 ]; then e_hex="0$e_hex"; fi
e=$(printf '%s' "$e_hex" | xxd -r -p | b64url)

# EC: the SPKI DER of a P-256 key ends with the 65-byte uncompressed point 04 || x || y.
point=$(openssl pkey -pubin -in ec_public.pem -outform DER | tail -c 65 | xxd -p | tr -d '\n')
if [ "${point:0:2}" != "04" ]; then echo "unexpected EC point encoding" >&2; exit 1; fi
x=$(printf '%s' "${point:2:64}" | xxd -r -p | b64url)
y=$(printf '%s' "${point:66:64}" | xxd -r -p | b64url)

cat > jwks.json <<JSON
{
  "keys": [
    {"kty": "RSA", "use": "sig", "kid": "rsa-1", "n": "$n", "e": "$e"},
    {"kty": "EC", "use": "sig", "kid": "ec-1", "crv": "P-256", "x": "$x", "y": "$y"}
  ]
}
JSON
echo "wrote $(pwd)/{rsa,ec,ed25519}_{private,public}.pem and jwks.json"
