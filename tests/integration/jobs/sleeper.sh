#!/bin/bash
# A job that keeps running until Slurm ends it (time limit or scancel).
echo "training started on $(hostname -s)"
for i in $(seq 1 3600); do
    echo "step $i"
    sleep 1
done
