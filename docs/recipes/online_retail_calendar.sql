-- The Online Retail shop's calendar, for its history (2010-12-01 ..
-- 2011-12-09): the UK bank holidays, Easter Sunday and the Christmas
-- closure, on which it took no order.  Its Saturdays need no row: it never
-- trades on one, and idle_weekdays() finds that in the data.
--   psql -f online_retail_calendar.sql   (after online_retail.sql)
INSERT INTO customer_analytics.closed_day (day, name) VALUES
    ('2010-12-27', 'Christmas Day (substitute)'), ('2010-12-28', 'Boxing Day (substitute)'),
    ('2011-01-03', 'New Year''s Day (substitute)'), ('2011-04-22', 'Good Friday'),
    ('2011-04-24', 'Easter Sunday'), ('2011-04-25', 'Easter Monday'), ('2011-04-29', 'Royal wedding'),
    ('2011-05-02', 'Early May bank holiday'), ('2011-05-30', 'Spring bank holiday'),
    ('2011-08-29', 'Summer bank holiday'), ('2011-12-26', 'Christmas Day (substitute)'),
    ('2011-12-27', 'Boxing Day (substitute)');
INSERT INTO customer_analytics.closed_day (day, name)
SELECT d::date, 'Christmas closure' FROM generate_series('2010-12-24'::date, '2011-01-02', interval '1 day') d
ON CONFLICT DO NOTHING;
