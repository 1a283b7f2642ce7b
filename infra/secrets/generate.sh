#!/bin/sh
# Random credentials for infra/compose.yaml, one file per Compose secret, in this folder (git-ignored). Files that
# exist are kept, so running it again changes nothing. Compose (without Swarm) mounts these files into the containers
# as they are, so they are world-readable and this folder is not: only its owner on the host can reach them.
set -eu
cd "$(dirname "$0")"
chmod 700 .
random() { LC_ALL=C tr -dc 'A-Za-z0-9' </dev/urandom | head -c "$1"; }
new() {  # new NAME VALUE
    [ -s "$1" ] || { printf '%s' "$2" >"$1" && chmod 644 "$1" && echo "wrote infra/secrets/$1"; }
}
new postgres_password "$(random 32)"
new s3_access_key "kiln$(random 16)"
new s3_secret_key "$(random 40)"
new mlflow_admin_password "$(random 32)"
new mlflow_flask_secret_key "$(random 48)"
new prefect_auth_string "kiln:$(random 32)"
new ray_auth_token "$(random 48)"
# Push access to KILN_GIT_URL for flow runs (they push their DVC experiment): git's credential-store format, one
# https://USER:TOKEN@HOST line per host. Left empty, a public repository can still be cloned.
[ -e git_credentials ] || { : >git_credentials && chmod 644 git_credentials; }
