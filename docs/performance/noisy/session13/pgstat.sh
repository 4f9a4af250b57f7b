#!/bin/bash
# after $1 s, read the HOT-update ratio of the run database's tables
sleep $1
db=$(psql -h 127.0.0.1 -U postgres -Atc "select datname from pg_database where datname not in ('postgres','root','test','template0','template1') limit 1")
echo "db=$db"
psql -h 127.0.0.1 -U postgres -d "$db" -Atc "select relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_live_tup, n_dead_tup from pg_stat_user_tables where n_tup_ins+n_tup_upd>0 order by relname"
psql -h 127.0.0.1 -U postgres -d "$db" -Atc "select c.relname, c.reloptions, pg_size_pretty(pg_relation_size(c.oid)) from pg_class c where c.relname like 'deliver%' and c.relkind in ('r','p')"
psql -h 127.0.0.1 -U postgres -d "$db" -Atc "select xact_commit, tup_inserted, tup_updated, blks_hit, blks_read from pg_stat_database where datname=current_database()"
