#!/bin/bash
# zfs compatibility wrapper for zfs-fuse 0.7, used by tests only.
#
# github.com/mistifyio/go-zfs/v3 lists datasets with
#   zfs list [-r|-d N] -Hp [-t TYPE] -o name,origin,used,...,written,logicalused,usedbydataset [NAME]
# zfs-fuse 0.7 has no -p flag on "zfs list" and does not know the written
# and logicalused properties. This wrapper answers such a listing with
#   zfs list -H -o name ...          (which datasets, in zfs's order)
#   zfs get -Hp -o name,property,value PROPS NAMES...   (exact numbers)
# and prints "-" for properties zfs-fuse does not have. Everything else is
# passed to the real zfs unchanged. Production OpenZFS needs none of this.
REAL=@REAL_ZFS@

if [ "$1" != list ]; then
	exec "$REAL" "$@"
fi

needp=0
props=name
args=()
shift
while [ $# -gt 0 ]; do
	case "$1" in
	-o) props=$2; shift 2; continue ;;
	-t|-d|-s|-S) args+=("$1" "$2"); shift 2; continue ;;
	-*)
		f=$1
		if [[ $f == *p* ]]; then needp=1; f=${f//p/}; fi
		[ "$f" != - ] && args+=("$f")
		;;
	*) args+=("$1") ;;
	esac
	shift
done

if [ $needp = 0 ]; then
	exec "$REAL" list -o "$props" "${args[@]}"
fi

names=$("$REAL" list -H -o name "${args[@]}") || exit $?
[ -z "$names" ] && exit 0

known=()
IFS=, read -ra want <<<"$props"
for p in "${want[@]}"; do
	case "$p" in
	written|logicalused|logicalreferenced) ;;
	*) known+=("$p") ;;
	esac
done
knownlist=$(IFS=,; echo "${known[*]}")

# shellcheck disable=SC2086
"$REAL" get -Hp -o name,property,value "$knownlist" $names | awk -F'\t' -v props="$props" -v names="$names" '
	{ v[$1 SUBSEP $2] = $3 }
	END {
		np = split(props, p, ",")
		nn = split(names, n, "\n")
		for (i = 1; i <= nn; i++) {
			line = ""
			for (j = 1; j <= np; j++) {
				k = n[i] SUBSEP p[j]
				val = (k in v) ? v[k] : "-"
				line = line (j > 1 ? "\t" : "") val
			}
			print line
		}
	}'
exit "${PIPESTATUS[0]}"
