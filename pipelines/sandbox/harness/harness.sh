# The judge's half of a bash test run: `bash harness.sh PROGRAM FD`.
#
# Candidate code never runs in this shell, which holds the per-run secret in an
# unexported variable.  Each function the candidate defines becomes a stub here
# that runs it in a fresh bash (call.sh), which does not inherit the secret.
# The tests run here, and the secret is printed once they have returned.
rr_program=$1
bash -n "$rr_program" || exit 97  # the runner's COMPILE_ERROR_STATUS
rr_call="${BASH_SOURCE[0]%/*}/call.sh"
IFS= read -r rr_secret <&"$2"
eval "exec $2<&-"
set --
rr_text=$(< "$rr_program")
rr_marker='# rr-tests-begin'
rr_code=${rr_text%"$rr_marker"*}
rr_tests=${rr_text##*"$rr_marker"}
# A candidate killed by a signal takes the test run down with it, as it would
# have if it had run in this shell.
rr_stub() {
    bash "$rr_call" "$rr_program" "$@"
    local status=$?
    ((status > 128 && status < 160)) && kill -s $((status - 128)) $$
    return $status
}
rr_function='^[[:space:]]*(function[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)[[:space:]]*(\(\)|\{|$)'
while IFS= read -r rr_line; do
    [[ $rr_line =~ $rr_function ]] || continue
    [[ -n ${BASH_REMATCH[1]} || ${BASH_REMATCH[3]} == "()" ]] || continue
    rr_name=${BASH_REMATCH[2]}
    case $(type -t "$rr_name") in
        builtin | keyword)
            if [[ $rr_tests =~ (^|[^A-Za-z0-9_])$rr_name([^A-Za-z0-9_]|$) ]]; then
                echo "rr-tampered: the program redefines '$rr_name', which the tests use" >&2
                exit 1
            fi
            ;;
        *) eval "$rr_name() { rr_stub $rr_name \"\$@\"; }" ;;
    esac
done <<< "$rr_code"
unset rr_line rr_name rr_function rr_text rr_code
eval "$rr_tests"
printf '\n%s\n' "$rr_secret"
