# One call of a candidate's function, for harness.sh: `bash call.sh PROGRAM NAME ARGS...`.
# Runs the candidate's code (the program up to the tests) and then the function.
rr_text=$(< "$1")
rr_marker='# rr-tests-begin'
shift
rr_call=("$@")
set --
# Top-level statements run on every call here, not once: what they print is
# not the call's output (the tests capture that with $(...)).
eval "${rr_text%"$rr_marker"*}" < /dev/null > /dev/null
"${rr_call[@]}"
