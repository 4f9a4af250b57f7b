#!/bin/bash
# Samples the bench database's PostgreSQL backends every ~50 ms: time, pid, backend start, client port, state, wait event.
out=$1
end=$((SECONDS+60))
while [ $SECONDS -lt $end ]; do
  psql -h 127.0.0.1 -U postgres -d postgres -At -F' ' -c "select to_char(clock_timestamp(),'HH24:MI:SS.MS'), pid, to_char(backend_start,'HH24:MI:SS.MS'), client_port, state, coalesce(wait_event_type,'-'), coalesce(wait_event,'-') from pg_stat_activity where datname like 'aegis_bench%'" >> $out 2>/dev/null
  sleep 0.05
done
