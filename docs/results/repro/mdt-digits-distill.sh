#!/bin/bash
cd "$(dirname "$0")/../../.."  # the repository root
L=docs/results/repro/mdt-digits-distill.log
fastdd --threads 1 experts --num-experts 5 --out runs/experts-digits >> $L 2>&1
for r in 0 0.1 0.3 0.5; do
  if [ "$r" = 0 ]; then M=""; else M="--mdt --mask-ratio $r"; fi
  echo "== $(date) r=$r" >> $L
  fastdd --threads 1 distill --method tesla --ipc 10 --iterations 500 --experts runs/experts-digits $M --out runs/mdt-digits-r$r >> $L 2>&1 \
   || fastdd --threads 1 distill --method tesla --ipc 10 --iterations 500 --experts runs/experts-digits $M --out runs/mdt-digits-r$r --resume >> $L 2>&1
done
echo "== done $(date)" >> $L
