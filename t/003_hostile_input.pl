# Hostile input: a deterministic generator of more than 10,000 mutated CSV
# texts and files, fed through ingest_csv_text() (texts: valid UTF-8, the
# database encoding) and ingest_csv() (files: any bytes, NUL and invalid
# UTF-8 included, read as UTF8 and transcoded from other encodings).
#
# What is injected: random bytes; random text with the CSV
# metacharacters; valid files mutated 1-4 times (bytes flipped, quotes,
# delimiters, line ends, "\." and byte-order marks inserted, spans deleted
# or duplicated, truncation, often inside a quoted field, lines with fields
# added or missing, empty lines); line ends mixed CRLF/LF/CR per line;
# unterminated and doubled quotes; fields of 256 kB to 2 MB (quoted, with
# line breaks inside); 10,000 columns (in the header, in the rows, and
# both); NUL bytes; invalid UTF-8 (bad leads, lone continuation bytes,
# overlong forms, surrogates, a sequence cut by the end of the file); a
# single line of 100 MB (once).  Targets: a table with a primary key, NOT
# NULL, a CHECK and typed columns (duplicate keys go through the bisecting
# path), and a table of text columns.
#
# Every tenth input is loaded with on_error => 'abort', every tenth other
# one with validate => true (a dry run), others with max_rejects => 2 or
# max_reject_ratio => 0.3; imputation rules of every kind fill missing
# values.  At the end the 500 files are loaded again, in one call, as a
# landing directory, among hostile entries: a FIFO without a writer, a
# listening socket, a directory, links to /dev/null and /etc/passwd (out of
# the allowed directories) and a link to one of the files (inside).
#
# What is verified:
#  - the backend never crashes: the postmaster is the same one at the end
#    (no crash-restart), the server answers, and its log has no
#    "terminated by signal", PANIC or TRAP;
#  - every call either returns a result with rows_read = rows_loaded +
#    rows_rejected, exactly rows_loaded rows of that load in the target
#    (none for a dry run; the rows of each target = the sum of rows_loaded
#    of its loads) and rows_rejected rows in ingest_reject, no reject at all
#    with on_error => 'abort', or is a clean whole-file refusal:
#    an ERROR with a SQLSTATE outside class XX (internal error), counted by
#    SQLSTATE;
#  - memory is bounded: the RssAnon of the one backend that loads
#    everything (from /proc/<pid>/status) grows by less than 32 MB over the
#    whole corpus, and is back within 32 MB of where it was after the
#    100 MB line;
#  - in the landing directory, each hostile entry is a failed load with the
#    reason's SQLSTATE, and nothing blocks.
use strict;
use warnings;
use utf8;
use IO::Socket::UNIX;
use POSIX qw(mkfifo);
use Socket qw(SOCK_STREAM);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use FindBin;
use lib "$FindBin::RealBin/lib";
use CustomerAnalytics qw(new_node);

my $node = new_node('hostile');
$node->safe_psql('postgres', 'CREATE DATABASE fuzz');
$node->safe_psql('fuzz', q{
    CREATE EXTENSION customer_analytics;
    -- without a header, fields fill the columns in order, load_id too:
    -- keep the real load ids out of the range of the corpus's numbers
    SELECT setval('customer_analytics.load_id_seq', 1000000000000);
    CREATE TABLE public.h (id integer PRIMARY KEY, name varchar(20) NOT NULL, amount numeric CHECK (amount >= 0),
                           ts timestamptz, load_id bigint);
    CREATE TABLE public.w (id text, name text, amount text, ts text DEFAULT 'no time', load_id bigint);
    CREATE TABLE public.landed (LIKE public.w);
    -- missing values are imputed, by every kind of rule
    INSERT INTO customer_analytics.imputation_rule VALUES
        ('public.h', 'name', 'constant', '?'), ('public.h', 'amount', 'previous', NULL),
        ('public.w', 'name', 'unknown', NULL), ('public.w', 'amount', 'previous', NULL),
        ('public.w', 'ts', 'default', NULL);
    CREATE TABLE public.fuzz_input (id integer PRIMARY KEY, kind text NOT NULL, target text NOT NULL,
                                    header boolean NOT NULL, extra boolean NOT NULL, encoding text, path text, data text,
                                    delimiter text, quote text, escape text, null_string text);
    CREATE TABLE public.fuzz_result (id integer PRIMARY KEY, load_id bigint, status text, rows_read bigint,
                                     rows_loaded bigint, rows_rejected bigint, sqlstate text, message text);
    CREATE FUNCTION public.fuzz_run(first integer, last integer) RETURNS bigint
    LANGUAGE plpgsql AS $$
    DECLARE
        i record;
        r record;
        st text;
        msg text;
        n bigint := 0;
    BEGIN
        FOR i IN SELECT * FROM public.fuzz_input WHERE id BETWEEN first AND last ORDER BY id LOOP
            BEGIN
                IF i.path IS NULL THEN
                    SELECT * INTO r FROM customer_analytics.ingest_csv_text(i.target::regclass, i.data,
                        header => i.header, ignore_extra_columns => i.extra, force => true,
                        on_error => CASE WHEN i.id % 10 = 3 THEN 'abort' ELSE 'reject' END, validate => i.id % 10 = 7,
                        max_rejects => CASE WHEN i.id % 10 = 5 THEN 2 END,
                        max_reject_ratio => CASE WHEN i.id % 10 = 9 THEN 0.3 END,
                        delimiter => COALESCE(i.delimiter, ','), quote => COALESCE(i.quote, '"'), escape => i.escape,
                        null_string => COALESCE(i.null_string, ''), source_name => 'fuzz ' || i.id);
                ELSE
                    SELECT * INTO r FROM customer_analytics.ingest_csv(i.target::regclass, i.path,
                        header => i.header, ignore_extra_columns => i.extra, encoding => i.encoding, force => true,
                        on_error => CASE WHEN i.id % 10 = 3 THEN 'abort' ELSE 'reject' END, validate => i.id % 10 = 7,
                        max_rejects => CASE WHEN i.id % 10 = 5 THEN 2 END,
                        max_reject_ratio => CASE WHEN i.id % 10 = 9 THEN 0.3 END);
                END IF;
                INSERT INTO public.fuzz_result (id, load_id, status, rows_read, rows_loaded, rows_rejected)
                VALUES (i.id, r.load_id, r.status, r.rows_read, r.rows_loaded, r.rows_rejected);
            EXCEPTION WHEN OTHERS THEN
                GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
                INSERT INTO public.fuzz_result (id, status, sqlstate, message) VALUES (i.id, 'error', st, msg);
            END;
            n := n + 1;
        END LOOP;
        RETURN n;
    END $$;
});

########################################################################
# The generator
########################################################################
srand(20261126);
sub rint { return int(rand($_[0])); }
sub pick { return $_[ rint(scalar @_) ]; }

my @names = ('ok', 'Ann', 'Zoë', 'Łukasz', '東京', 'a,b', 'say "hi"', "two\nlines", '', ' ', 'x' x 25, 'Ω≈ç√', "tab\there", '\\N', 'NULL');
my @amounts = ('0', '1.5', '-1', '1e400', 'NaN', 'abc', '', '99999999999999999999999999', '1,5', '0x10', '  7 ');
my @stamps = ('2025-01-01 10:00+00', '2025-02-30', 'infinity', 'yesterday', '', 'garbage', '2025-13-01', '1999-12-31 23:59:60');
my @ids = ('', '-1', 'abc', '2147483648', '1.0', ' 3', '00012');

sub field
{
	my ($v) = @_;
	return ($v =~ /[,"\r\n]/ || rand() < 0.1) ? '"' . ($v =~ s/"/""/gr) . '"' : $v;
}

# a valid-looking file: header and rows, with a given line end
sub base_csv
{
	my ($eol) = @_;
	$eol //= "\n";
	my @lines = ('id,name,amount,ts');
	for (1 .. 1 + rint(30))
	{
		my $id = rand() < 0.9 ? 1 + rint(200000) : pick(@ids);
		my $name = rand() < 0.7 ? 'n' . rint(1000) : pick(@names);
		my $amount = rand() < 0.8 ? sprintf('%.2f', rand(1000)) : pick(@amounts);
		my $ts = rand() < 0.8 ? sprintf('2025-%02d-%02d %02d:00+00', 1 + rint(12), 1 + rint(28), rint(24)) : pick(@stamps);
		push @lines, join(',', map { field($_) } $id, $name, $amount, $ts);
	}
	return join($eol, @lines) . (rand() < 0.8 ? $eol : '');
}

my @specials = ('"', '""', "\r", "\n", "\r\n", ',', "\\.", "\n\\.\n", "\x{FEFF}", "\t", '\\', ',,,,', "\"\n\"", '"x', "\n\n", 'é', '𝄞');

sub random_text
{
	my $len = rint(3000);
	my $s = '';
	while (length($s) < $len)
	{
		my $r = rand();
		$s .= $r < 0.6 ? chr(32 + rint(95)) : $r < 0.9 ? pick(@specials) : chr(0x80 + rint(0x2000));
	}
	return $s;
}

# one mutation of a text (characters, not bytes: the result stays valid
# text); the same on bytes for files
sub mutate
{
	my ($s) = @_;
	my $len = length($s);
	my $op = rint(10);
	my $pos = $len ? rint($len) : 0;
	if ($op == 0) { substr($s, $pos, 1, chr(32 + rint(95))) if $len; }
	elsif ($op == 1) { substr($s, $pos, 0, pick(@specials)); }
	elsif ($op == 2) { substr($s, $pos, rint(40), ''); }
	elsif ($op == 3) { $s = substr($s, 0, $pos); }                            # truncated, maybe inside quotes
	elsif ($op == 4) { substr($s, $pos, 0, substr($s, rint($len + 1), rint(200))); }   # duplicated span
	elsif ($op == 5) { $s =~ s/\r?\n/pick("\r\n", "\n", "\r")/ge; }          # line ends mixed per line
	elsif ($op == 6) { substr($s, $pos, 0, "\n" x (1 + rint(3))); }          # empty lines
	elsif ($op == 7) { substr($s, $pos, 0, ',' . 'extra' x rint(3)); }        # a field more
	elsif ($op == 8) { $s =~ s/,[^,\n]*//; }                                  # a field less
	else { substr($s, $pos, 0, '"'); }                                        # an opening quote
	return $s;
}

my @inputs;    # [kind, target, header, extra, encoding, path, data, [delimiter, quote, escape, null_string]]
my $dir = $node->basedir . '/fuzz';
mkdir $dir or die "mkdir $dir: $!";
sub add_text { my ($kind, $target, $header, $extra, $data) = @_; push @inputs, [ $kind, $target, $header, $extra, undef, undef, $data ]; }
sub add_file
{
	my ($kind, $target, $header, $extra, $encoding, $bytes) = @_;
	my $path = sprintf('%s/%05d.csv', $dir, scalar(@inputs) + 1);
	open my $fh, '>:raw', $path or die "$path: $!";
	print $fh $bytes;
	close $fh;
	push @inputs, [ $kind, $target, $header, $extra, $encoding, $path, undef ];
}

# texts through ingest_csv_text
for (1 .. 8000)
{
	my $s = base_csv(pick("\n", "\r\n", "\r"));
	$s = mutate($s) for 1 .. 1 + rint(4);
	add_text('mutated', pick('public.h', 'public.h', 'public.w'), rand() < 0.85 ? 1 : 0, rand() < 0.3 ? 1 : 0, $s);
}
for (1 .. 1000)
{
	add_text('random text', pick('public.h', 'public.w'), rint(2), rint(2), random_text());
}
for (1 .. 600)    # every line its own line end, some quoted fields spanning lines
{
	my @l = split /\n/, base_csv("\n");
	add_text('mixed line ends', 'public.h', 1, 0, join('', map { $_ . pick("\r\n", "\n", "\r") } @l));
}
for (1 .. 400)    # unterminated, doubled and stray quotes
{
	my $s = base_csv();
	my $cut = index($s, '"', rint(length $s));
	$s = $cut >= 0 && rand() < 0.5 ? substr($s, 0, $cut + 1 + rint(10)) : $s . "\n" . ('"' x (1 + rint(3))) . '1,x';
	add_text('quotes', pick('public.h', 'public.w'), 1, 0, $s);
}
for (1 .. 300)    # other delimiters, quotes, escapes and NULL strings, valid or not
{
	my @o = (pick(',', ';', '|', "\t", 'é', '', ',,', "\n", "\r", '\\', 'a', '"', ' ', '.'),
	         pick('"', "'", '|', '', 'ab', "\n", ';', 'é'),
	         pick(undef, '\\', '"', "'", '', '|'),
	         pick('', '\\N', 'NULL', ',', '"', "\n", 'é'));
	my $s = base_csv();
	my $d = length($o[0]) == 1 ? $o[0] : ';';
	$s =~ s/,/$d/g;
	$s = mutate($s) if rand() < 0.5;
	push @inputs, [ 'options', pick('public.h', 'public.w'), rint(2), 0, undef, undef, $s, \@o ];
}
for (1 .. 24)     # huge fields: 256 kB to 2 MB, quoted with line breaks, or bare
{
	my $big = ('y' x 4095 . (rand() < 0.5 ? "\n" : 'z')) x (64 * (1 + rint(8)));
	my $f = rand() < 0.5 ? '"' . $big . '"' : $big =~ s/\n/ /gr;
	add_text('huge field', pick('public.h', 'public.w'), 1, 0, "id,name,amount,ts\n1,$f,1,\n2,ok,2,\n");
}
for my $i (1 .. 12)    # 10,000 columns
{
	my $header = join(',', 'id', 'name', map { "c$_" } 3 .. 10000);
	my $row = join(',', 1 .. 10000);
	my $data = $i % 3 == 0 ? "$header\n$row\n" : $i % 3 == 1 ? "id,name,amount,ts\n$row\n$row\n" : "$row\n";
	add_text('10,000 columns', 'public.w', $i % 3 != 2 ? 1 : 0, $i % 2, $data);
}
my $texts = scalar @inputs;

# files through ingest_csv: bytes that text cannot hold
my @bad_utf8 = ("\xC3\x28", "\xFF", "\xFE\xFF", "\x80", "\xC0\xAF", "\xED\xA0\x80", "\xF4\x90\x80\x80", "\xE2\x82", "\xF0\x9F\x98");
for (1 .. 500)
{
	my $kind = pick('random bytes', 'NUL bytes', 'invalid UTF-8', 'mutated bytes');
	my $b;
	if ($kind eq 'random bytes')
	{
		$b = join('', map { chr(rint(256)) } 1 .. rint(4000));
	}
	else
	{
		$b = base_csv(pick("\n", "\r\n", "\r"));
		utf8::encode($b);
		for (1 .. 1 + rint(4))
		{
			my $ins = $kind eq 'NUL bytes' ? "\0" x (1 + rint(3)) : $kind eq 'invalid UTF-8' ? pick(@bad_utf8) : chr(rint(256));
			substr($b, rint(length($b) + 1), 0, $ins);
		}
		$b .= pick(@bad_utf8) if $kind eq 'invalid UTF-8' && rand() < 0.3;    # cut at the end of the file
	}
	add_file($kind, pick('public.h', 'public.w'), rint(2), rint(2),
		rand() < 0.7 ? 'UTF8' : pick('LATIN1', 'WIN1252', 'SJIS', 'EUC_JP', 'GB18030', 'BIG5'), $b);
}
my $files = scalar(@inputs) - $texts;
my $corpus = scalar @inputs;
cmp_ok($corpus, '>=', 10_000, "the corpus has $corpus inputs ($texts texts, $files files)");

# into the database: hex, so that any text survives the trip
{
	my $tsv = "$dir/corpus.tsv";
	open my $fh, '>:raw', $tsv or die "$tsv: $!";
	for my $i (0 .. $#inputs)
	{
		my ($kind, $target, $header, $extra, $encoding, $path, $data, $opts) = @{ $inputs[$i] };
		my @opts = map { defined $_ ? unpack('H*', do { my $x = $_; utf8::encode($x); $x }) : '\\N' } @{ $opts // [ (undef) x 4 ] };
		my $hex = '\\N';
		if (defined $data)
		{
			my $bytes = $data;
			utf8::encode($bytes);
			$hex = unpack('H*', $bytes);
		}
		print $fh join("\t", $i + 1, $kind, $target, $header ? 't' : 'f', $extra ? 't' : 'f',
			$encoding // '\\N', $path // '\\N', $hex, @opts), "\n";
	}
	close $fh;
	$node->safe_psql('fuzz', qq{
		CREATE TEMP TABLE raw (id int, kind text, target text, header bool, extra bool, encoding text, path text, hex text,
		                       d text, q text, e text, n text);
		COPY raw FROM '$tsv';
		INSERT INTO public.fuzz_input SELECT id, kind, target, header, extra, encoding, path,
		       convert_from(decode(hex, 'hex'), 'UTF8'), convert_from(decode(d, 'hex'), 'UTF8'),
		       convert_from(decode(q, 'hex'), 'UTF8'), convert_from(decode(e, 'hex'), 'UTF8'),
		       convert_from(decode(n, 'hex'), 'UTF8') FROM raw});
}

########################################################################
# Feed it to one backend, watching its memory
########################################################################
my $start_time = $node->safe_psql('postgres', 'SELECT pg_postmaster_start_time()');
my $session = $node->background_psql('fuzz');
$session->query_safe('SET client_min_messages = error');
my $pid = $session->query_safe('SELECT pg_backend_pid()');
chomp $pid;

sub rss_anon_kb
{
	open my $fh, '<', "/proc/$pid/status" or die "/proc/$pid/status: $!";
	my ($kb) = map { /^RssAnon:\s+(\d+) kB/ ? $1 : () } <$fh>;
	close $fh;
	return $kb;
}

my $batch = 250;
# warm up the backend's caches on the first batch before measuring
$session->query_safe("SELECT public.fuzz_run(1, $batch)");
my $rss_before = rss_anon_kb();
my $rss_max = $rss_before;
my @rss_samples = ($rss_before);
for (my $first = $batch + 1; $first <= $corpus; $first += $batch)
{
	my $last = $first + $batch - 1;
	$session->query_safe("SELECT public.fuzz_run($first, $last)");
	my $rss = rss_anon_kb();
	$rss_max = $rss if $rss > $rss_max;
	push @rss_samples, $rss;
}
my $rss_after = rss_anon_kb();
note sprintf('backend RssAnon: %d kB after the first %d inputs, %d kB after all %d (max %d kB, growth %+d kB)',
	$rss_before, $batch, $rss_after, $corpus, $rss_max, $rss_after - $rss_before);
note 'RssAnon (kB) after each batch of ' . $batch . ': ' . join(' ', @rss_samples);
cmp_ok($rss_after - $rss_before, '<', 32 * 1024, 'memory of the loading backend stays bounded over the corpus');

# the single line of 100 MB (a field of 100 MB), once
my $huge = "$dir/one_line_100mb.csv";
{
	open my $fh, '>:raw', $huge or die "$huge: $!";
	print $fh "id,name,amount,ts\n1,";
	my $chunk = 'y' x (1024 * 1024);
	print $fh $chunk for 1 .. 100;
	print $fh ",1,\n";
	close $fh;
}
my $rss_huge_before = rss_anon_kb();
my $huge_result = $session->query_safe(qq{
	SELECT status || ' ' || rows_read || ' ' || rows_loaded || ' ' || rows_rejected
	FROM customer_analytics.ingest_csv('public.w', '$huge', force => true)});
chomp $huge_result;
is($huge_result, 'loaded 1 1 0', 'a 100 MB single line loads into a text column');
$huge_result = $session->query_safe(qq{
	SELECT status || ' ' || rows_read || ' ' || rows_loaded || ' ' || rows_rejected
	FROM customer_analytics.ingest_csv('public.h', '$huge', force => true)});
chomp $huge_result;
is($huge_result, 'loaded 1 0 1', 'a 100 MB single line is one reject for a varchar(20) column');
my $rss_huge_after = rss_anon_kb();
note sprintf('backend RssAnon around the 100 MB line: %d kB before, %d kB after', $rss_huge_before, $rss_huge_after);
cmp_ok($rss_huge_after - $rss_huge_before, '<', 32 * 1024, 'memory is given back after the 100 MB line');
is($session->query_safe(q{SELECT length(raw_line) || ' ' || raw_truncated FROM customer_analytics.ingest_reject
                          WHERE file LIKE '%one_line_100mb.csv'}) =~ s/\s+$//r,
	'65536 true', 'its reject keeps the first 64 kB of the line');
$session->quit;

# the files again, as a landing directory, in one call, among hostile
# entries (names that match the pattern): each is loaded or recorded as
# failed, and the others go on
mkfifo("$dir/fifo0.csv", 0600) or die "mkfifo: $!";
my $socket = IO::Socket::UNIX->new(Type => SOCK_STREAM, Local => "$dir/sock0.csv", Listen => 1)
  or die "socket: $!";
mkdir "$dir/dir00.csv" or die "mkdir: $!";
symlink('/dev/null',   "$dir/null0.csv") or die "symlink: $!";
symlink('/etc/passwd', "$dir/pass0.csv") or die "symlink: $!";
opendir my $fuzz_dh, $dir or die "opendir: $!";
my ($first_file) = sort grep { /^\d{5}\.csv$/ } readdir $fuzz_dh;
closedir $fuzz_dh;
symlink($first_file,   "$dir/link0.csv") or die "symlink: $!";
my %hostile = ('fifo0.csv' => '42809', 'sock0.csv' => '42809', 'dir00.csv' => '42809',
	'null0.csv' => '42501', 'pass0.csv' => '42501');
my $entries = $files + scalar(keys %hostile) + 1;
my $landing = $node->safe_psql('fuzz', qq{
	SET customer_analytics.ingest_allowed_directories = '$dir';
	SELECT count(*) || ' ' || count(*) FILTER (WHERE status = 'loaded' AND rows_read = rows_loaded + rows_rejected)
	       || ' ' || count(*) FILTER (WHERE status = 'failed' AND rows_loaded = 0)
	       || ' ' || count(*) FILTER (WHERE status = 'skipped' AND rows_loaded = 0)
	FROM customer_analytics.ingest_directory('public.landed', '$dir', '?????.csv', header => false)},
	timeout => 600);
my ($landed, $landed_ok, $landed_failed, $landed_same) = split / /, $landing;
note "landing directory: $landed files, $landed_ok loaded, $landed_failed failed, $landed_same skipped (same content as another)";
is($landed, $entries, "ingest_directory went through the $files files and the 6 other entries");
is($landed_ok + $landed_failed + $landed_same, $entries,
	'each was loaded with every row accounted for, recorded as failed, or skipped as a copy');
is($node->safe_psql('fuzz', q{
	SELECT string_agg(regexp_replace(file, '.*/', '') || ' ' || substring(message FROM 'SQLSTATE (.....)'), ', ' ORDER BY file)
	FROM customer_analytics.ingest_load WHERE target = 'public.landed' AND file ~ '/(fifo|sock|dir|null|pass)0+\.csv$' AND status = 'failed'}),
	join(', ', map { "$_ $hostile{$_}" } sort keys %hostile),
	'each hostile entry failed: the FIFO, the socket and the directory as not regular files, the links out as outside');
is($node->safe_psql('fuzz', q{SELECT count(*) FROM customer_analytics.ingest_load
                             WHERE target = 'public.landed' AND file LIKE '%/link0.csv' AND message LIKE '%leads to%'}),
	'0', 'the link to a file of the directory was not refused for being a link');
close $socket;
is($node->safe_psql('fuzz', q{SELECT sum(rows_loaded) FROM customer_analytics.ingest_load WHERE target = 'public.landed'}),
	$node->safe_psql('fuzz', 'SELECT count(*) FROM public.landed'), 'the rows landed are the sum of rows_loaded');

########################################################################
# Every call accounted for
########################################################################
is($node->safe_psql('fuzz', 'SELECT count(*) FROM public.fuzz_result'), $corpus, 'every input was tried');
is($node->safe_psql('fuzz', q{SELECT count(*) FROM public.fuzz_result
                             WHERE status <> 'error' AND rows_read <> rows_loaded + rows_rejected}),
	'0', 'rows_read = rows_loaded + rows_rejected for every load');
my $mismatch = $node->safe_psql('fuzz', q{
	WITH staged AS (SELECT load_id, count(*) AS n FROM public.h GROUP BY 1
	                UNION ALL SELECT load_id, count(*) FROM public.w GROUP BY 1),
	     rejected AS (SELECT load_id, count(*) AS n FROM customer_analytics.ingest_reject GROUP BY 1)
	SELECT r.id, i.kind, i.header, r.load_id, r.rows_read, r.rows_loaded, r.rows_rejected,
	       COALESCE((SELECT sum(n) FROM staged s WHERE s.load_id = r.load_id), 0) AS staged,
	       COALESCE((SELECT n FROM rejected j WHERE j.load_id = r.load_id), 0) AS rejects
	FROM public.fuzz_result r JOIN public.fuzz_input i USING (id)
	WHERE r.status IN ('loaded', 'validated')
	  AND ((i.header AND r.status = 'loaded' AND COALESCE((SELECT sum(n) FROM staged s WHERE s.load_id = r.load_id), 0) <> r.rows_loaded)
	       OR COALESCE((SELECT n FROM rejected j WHERE j.load_id = r.load_id), 0) <> r.rows_rejected)
	ORDER BY r.id});
is($mismatch, '', 'each load left exactly rows_rejected rejects and, with a header, rows_loaded rows of its load_id');
# without a header the fields fill the columns in order, load_id included:
# count those rows by table
foreach my $t ('public.h', 'public.w')
{
	is($node->safe_psql('fuzz', qq{SELECT sum(rows_loaded) FROM customer_analytics.ingest_load
	                              WHERE target = '$t' AND status = 'loaded'}),
		$node->safe_psql('fuzz', "SELECT count(*) FROM $t"),
		"the rows in $t are the sum of rows_loaded of its loads");
}
is($node->safe_psql('fuzz', q{SELECT count(*) FROM public.fuzz_result
                             WHERE status NOT IN ('loaded', 'error') AND NOT (status = 'validated' AND id % 10 = 7)}),
	'0', 'every call loaded (validated, for a dry run) or was refused');
is($node->safe_psql('fuzz', q{SELECT count(*) FROM public.fuzz_result
                             WHERE (id % 10 = 5 AND rows_rejected > 2) OR (id % 10 = 9 AND rows_rejected > 0.3 * rows_read)}),
	'0', 'reject limits hold');
cmp_ok($node->safe_psql('fuzz', q{SELECT count(*) FROM public.fuzz_result WHERE id % 10 IN (5, 9) AND sqlstate = '54000'}),
	'>', 100, 'many loads stopped at a reject limit');
is($node->safe_psql('fuzz', q{SELECT count(*) FROM public.fuzz_result WHERE id % 10 = 3 AND rows_rejected > 0}),
	'0', 'with on_error => abort, a file with a bad row is refused whole');
cmp_ok($node->safe_psql('fuzz', q{SELECT count(*) FROM public.fuzz_result WHERE id % 10 = 3 AND status = 'error'}),
	'>', 100, 'many files were refused whole with on_error => abort');
is($node->safe_psql('fuzz', q{SELECT count(*) FROM public.fuzz_result WHERE status = 'error' AND (sqlstate IS NULL OR sqlstate LIKE 'XX%')}),
	'0', 'every refusal is a clean error with a SQLSTATE (no internal error)');

my $summary = $node->safe_psql('fuzz', q{
	SELECT string_agg(format('%s: %s calls, %s loaded (%s rows read, %s loaded, %s rejected), %s refused',
	                         kind, calls, loads, rows_read, rows_loaded, rows_rejected, errors), E'\n' ORDER BY kind)
	FROM (SELECT i.kind, count(*) AS calls, count(*) FILTER (WHERE r.status = 'loaded') AS loads,
	             sum(r.rows_read) AS rows_read, sum(r.rows_loaded) AS rows_loaded, sum(r.rows_rejected) AS rows_rejected,
	             count(*) FILTER (WHERE r.status = 'error') AS errors
	      FROM public.fuzz_input i JOIN public.fuzz_result r USING (id) GROUP BY 1) s});
note $summary;
note $node->safe_psql('fuzz', q{
	SELECT string_agg(format('refused with SQLSTATE %s: %s (e.g. %s)', sqlstate, n, message), E'\n' ORDER BY n DESC)
	FROM (SELECT sqlstate, count(*) AS n, min(message) AS message FROM public.fuzz_result WHERE status = 'error' GROUP BY 1) s});
note $node->safe_psql('fuzz', q{
	SELECT string_agg(format('rejected with SQLSTATE %s: %s', sqlstate, n), E'\n' ORDER BY n DESC)
	FROM (SELECT sqlstate, count(*) AS n FROM customer_analytics.ingest_reject GROUP BY 1) s});
cmp_ok($node->safe_psql('fuzz', q{SELECT count(*) FROM public.fuzz_result WHERE rows_loaded > 0}), '>', 1000,
	'many inputs still loaded rows');
cmp_ok($node->safe_psql('fuzz', q{SELECT sum(rows_rejected) FROM public.fuzz_result}), '>', 1000,
	'many rows were rejected');

########################################################################
# The server never crashed
########################################################################
is($node->safe_psql('postgres', 'SELECT pg_postmaster_start_time()'), $start_time,
	'the server is up and never restarted');
my $log = slurp_file($node->logfile);
unlike($log, qr/terminated by signal|PANIC|TRAP:/, 'no backend terminated by a signal');

$node->stop;
done_testing();
