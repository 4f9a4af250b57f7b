import sys
# the flood's publish-and-move phase: rows where the broker uses at least half a core
for f in sys.argv[1:]:
    rows=[l.split() for l in open(f)]
    head=rows[0][1:]
    ib=head.index('beam.smp'); ii=head.index('aw:ingester')
    ph=[r for r in rows[1:] if float(r[1+ib])>=0.5]
    print(f, 'rows', len(ph), 'secs %.1f'%(len(ph)*0.2), 'ingester CPU s %.2f'%(sum(float(r[1+ii]) for r in ph)*0.2), 'broker CPU s %.2f'%(sum(float(r[1+ib]) for r in ph)*0.2))
