#!/bin/bash
# Rerun of README "Trust report for digits" with 4 of its 7 sets (same commands), after the design issue's changes.
cd /work/exp7
set -x
fastdd --threads 1 distill --ipc 10 --iterations 0 --out runs/real10 --overwrite --quiet
fastdd --threads 1 distill --method dsa --ipc 10 --iterations 30 --out runs/dsa10 --overwrite --quiet &
fastdd --threads 1 distill --method dm --ipc 10 --iterations 1000 --out runs/digits-dm10 --overwrite --quiet &
wait
fastdd --threads 1 distill --method dm --ipc 10 --iterations 1000 --outliers poe --out runs/digits-dm10-poe --overwrite --quiet
fastdd report runs/real10 runs/dsa10 runs/digits-dm10 runs/digits-dm10-poe --out reports/digits --runs 3 --epochs 300 --ood gaussian,uniform,fashion-mnist --overwrite --quiet
