#!/bin/sh
# The nightly scoring job with its exit codes applied (docs/deploy.md): 0 done and 2 (bad arguments
# or checkpoint: another try cannot help) end it; 1 (an input missing after the write) is scored
# again at once; 3 (another run holds the output) again after STEELRAY_BUSY_WAIT_S seconds (900);
# at most STEELRAY_ATTEMPTS runs (3). Its exit code is the last run's. The RayCronJob's entrypoint,
# and what cron or Airflow submit, since `ray job submit` and KubeRay see only failed or succeeded:
#   sh deploy/nightly.sh --config /config/score.yaml [score.* settings]
attempts=${STEELRAY_ATTEMPTS:-3}
wait_s=${STEELRAY_BUSY_WAIT_S:-900}
n=0
while :; do
  n=$((n + 1))
  python jobs/score.py "$@"
  code=$?
  [ "$code" -eq 1 ] || [ "$code" -eq 3 ] || exit "$code"
  [ "$n" -lt "$attempts" ] || exit "$code"
  if [ "$code" -eq 3 ]; then
    echo "nightly: exit 3 (another run holds the output): trying again in ${wait_s} s" >&2
    sleep "$wait_s"
  else
    echo "nightly: exit 1 (the output missed inputs after the write): scoring them again" >&2
  fi
done
