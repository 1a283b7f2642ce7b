#!/bin/sh
# The kiln image's entry point. Compose hands secrets over as files under /run/secrets: for each variable below
# whose NAME_FILE is set, export NAME with that file's content, then run the command. Kubernetes sets the variables
# themselves from Secrets, and KubeRay replaces the entry point, so there NAME_FILE is never set.
set -eu
for name in AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY PGPASSWORD MLFLOW_TRACKING_PASSWORD MLFLOW_AUTH_ADMIN_PASSWORD \
    MLFLOW_FLASK_SERVER_SECRET_KEY PREFECT_API_AUTH_STRING PREFECT_SERVER_API_AUTH_STRING; do
    file=$(printenv "${name}_FILE" || true)
    if [ -n "$file" ]; then
        value=$(cat "$file")
        export "$name=$value"
        unset "${name}_FILE"
    fi
done
exec "$@"
