# sample wait events of active client backends every 50 ms for $1 seconds
end=$((SECONDS+$1))
while [ $SECONDS -lt $end ]; do
  psql -h 127.0.0.1 -U postgres -d postgres -Atc "select coalesce(wait_event_type,'CPU')||':'||coalesce(wait_event,'-') from pg_stat_activity where backend_type='client backend' and state='active' and datname like 'aegis%' and pid<>pg_backend_pid()" 2>/dev/null
  sleep 0.05
done
