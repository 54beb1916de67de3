# One call of a candidate's function, for harness.sh: `bash call.sh PROGRAM NAME ARGS...`.
# Runs the candidate's code (the program up to the tests) and then the function.
rr_text=$(< "$1")
rr_marker='# rr-tests-begin'
shift
rr_call=("$@")
set --
eval "${rr_text%"$rr_marker"*}"
"${rr_call[@]}"
