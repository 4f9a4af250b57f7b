#!/bin/bash
# Runs one production noisy benchmark and, once A starts publishing, samples
# RabbitMQ's busiest Erlang processes (by reductions) over the next second,
# and again 10 s later (the drain).
BIN=${BIN:-/tmp/aw-base}; OUT=$1
/tmp/ab --bin $BIN --mode production --scenario noisy --json $OUT.json > $OUT.txt 2>&1 &
PID=$!
until grep -q "publishing via amqp" $OUT.txt 2>/dev/null; do sleep 0.05; done
sleep 0.1
Q="$(cat "$(dirname "$0")/recon.erl")"
rabbitmqctl eval "$Q" > $OUT.recon-blast.txt 2>&1
sleep 9
rabbitmqctl eval "$Q" > $OUT.recon-drain.txt 2>&1
wait $PID
