<?php
// The judge's half of a PHP test run: `php harness.php PROGRAM FD`.
//
// One expression runs everything, in the global scope the program expects:
// its first argument reads the per-run secret from the pipe FD, before any
// candidate code; the second evaluates the candidate's code, the third the
// tests (each part re-read from the read-only program file, so nothing the
// candidate can reach decides what runs).  The secret waits as an argument of
// a call still being prepared, which no PHP code can read, and the call that
// prints it happens only once both evaluations have returned normally: a
// `return` in the candidate's code ends only its own part, and exit(),
// uncaught exceptions and shutdown functions never reach it.

define('RR_PROGRAM', $argv[1]);
define('RR_MARKER', "\n/* rr-tests-begin */\n");

(static function (string $secret, $code, $tests): void {
    while (ob_get_level() > 0) {
        ob_end_flush();  // what the program buffered comes before the secret
    }
    fwrite(STDOUT, "\n" . $secret . "\n");
})(
    (static function (): string {
        $pipe = fopen('php://fd/' . (int) array_pop($GLOBALS['argv']), 'rb');
        $secret = trim(stream_get_contents($pipe));
        fclose($pipe);
        array_shift($GLOBALS['argv']);  // the program sees itself as the script
        $GLOBALS['argc'] = count($GLOBALS['argv']);
        $_SERVER['argv'] = $GLOBALS['argv'];
        $_SERVER['argc'] = $GLOBALS['argc'];
        return $secret;
    })(),
    eval('?>' . (static function (): string {
        $text = file_get_contents(RR_PROGRAM);
        return substr($text, 0, strrpos($text, RR_MARKER));
    })()),
    eval((static function (): string {
        $text = file_get_contents(RR_PROGRAM);
        return substr($text, strrpos($text, RR_MARKER) + strlen(RR_MARKER));
    })())
);
