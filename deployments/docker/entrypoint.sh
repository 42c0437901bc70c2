#!/bin/sh
# Entrypoint of the NETRT image: one image, a role per container.
#   listener (default)  netrt listener --config $NETRT_CONFIG   DICOM listener, runs go to the API
#   worker              netrt worker --config $NETRT_CONFIG     Prefect process worker, pool netrt
#   serve               netrt serve --config $NETRT_CONFIG      everything in one container
#   deploy              register the deployments of prefect.yaml with the API (one-shot)
#   health              C-ECHO this container's own listener (the HEALTHCHECK)
#   netrt|prefect|python|sh ...  run that command (a Prefect docker worker runs `prefect flow-run execute`)
#   anything else       netrt <anything else>, e.g. `config show`
set -eu
role="${1:-listener}"
[ "$#" -gt 0 ] && shift
case "$role" in
    listener | worker | serve)
        exec netrt "$role" --config "$NETRT_CONFIG" "$@" ;;
    deploy)
        cd "$NETRT_HOME"
        prefect work-pool inspect netrt > /dev/null 2>&1 || prefect work-pool create netrt --type process
        prefect --no-prompt deploy --all
        exec prefect --no-prompt deploy --name process-study \
            --concurrency-limit "$(netrt config get prefect.process_study_concurrency "$NETRT_CONFIG")" ;;
    health)
        exec netrt echo --self --config "$NETRT_CONFIG" ;;
    netrt | prefect | python | python3 | sh)
        exec "$role" "$@" ;;
    *)
        exec netrt "$role" "$@" ;;
esac
